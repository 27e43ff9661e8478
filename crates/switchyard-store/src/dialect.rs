//! How one statement text serves both backends.
//!
//! The shared statements in `store/` are written once, with PostgreSQL's
//! numbered placeholders (`$1`; sqlx's SQLite driver maps `$n` to the n-th
//! bound value too) and a few dialect tokens that each backend renders:
//!
//! - `@now`: the current time. PostgreSQL reads its own clock (`now()`), so
//!   replicas with skewed clocks agree on liveness, leases and deadlines;
//!   SQLite serves one replica and takes this process's clock, bound as one
//!   more parameter after the statement's own (see [`BindNow`]).
//! - `@ago($n)`: the instant the duration in `$n` before now. The value
//!   bound for `$n` is [`Dialect::ago`] of the duration.
//! - `@for_update`: locks the selected rows until the transaction ends.
//!   SQLite needs no row lock: every writing transaction there holds the
//!   database's one write lock from its start.
//! - `@for_key_share`: a weaker row lock that only `FOR UPDATE` waits for
//!   (PostgreSQL's `FOR KEY SHARE`); nothing on SQLite, as above.
//!
//! [`sql!`] renders a template once per backend and keeps the text, so
//! both pools prepare and cache it like a literal.

use std::time::Duration;

use sqlx::query::{Query, QueryAs, QueryScalar};

/// What differs in the text of a shared statement.
pub(crate) trait Dialect {
    /// What `@ago($n)` expects bound for `$n`.
    type Ago;
    /// The backend's name, for logs and metrics.
    const NAME: &'static str;
    /// `@for_update`.
    const FOR_UPDATE: &'static str;
    /// `@for_key_share`.
    const FOR_KEY_SHARE: &'static str;

    /// `@now`, in a statement whose own parameters end at `$last`.
    fn now(last: usize) -> String;
    /// `@ago($n)`.
    fn ago_sql(param: &str) -> String;
    /// The value to bind for an `@ago($n)` parameter.
    fn ago(d: Duration) -> Self::Ago;
    /// `@labels_contain($n)`: the row's `labels` hold every pair of the
    /// JSON object bound as `$n`.
    fn labels_contain(param: &str) -> String;

    /// The statement text of `template` in this dialect.
    fn render(template: &str) -> String {
        let last = highest_param(template);
        let mut out = String::with_capacity(template.len());
        let mut rest = template;
        while let Some(at) = rest.find('@') {
            out.push_str(&rest[..at]);
            rest = &rest[at..];
            if let Some(after) = rest.strip_prefix("@now") {
                out.push_str(&Self::now(last));
                rest = after;
            } else if let Some(after) = rest.strip_prefix("@for_update") {
                out.push_str(Self::FOR_UPDATE);
                rest = after;
            } else if let Some(after) = rest.strip_prefix("@for_key_share") {
                out.push_str(Self::FOR_KEY_SHARE);
                rest = after;
            } else if let Some(after) = rest.strip_prefix("@labels_contain(") {
                let close = after.find(')').expect("@labels_contain( is closed");
                out.push_str(&Self::labels_contain(&after[..close]));
                rest = &after[close + 1..];
            } else if let Some(after) = rest.strip_prefix("@ago(") {
                let close = after.find(')').expect("@ago( is closed");
                out.push_str(&Self::ago_sql(&after[..close]));
                rest = &after[close + 1..];
            } else {
                panic!("unknown dialect token in {template:?}");
            }
        }
        out.push_str(rest);
        out
    }
}

/// The highest `$n` placeholder in `sql` (0 without any).
fn highest_param(sql: &str) -> usize {
    sql.split('$')
        .skip(1)
        .filter_map(|s| {
            let digits = s.bytes().take_while(u8::is_ascii_digit).count();
            s[..digits].parse().ok()
        })
        .max()
        .unwrap_or(0)
}

/// Binds the value of `@now`: after every other parameter, on backends
/// that take the time from this process; nothing on PostgreSQL.
pub(crate) trait BindNow {
    fn bind_now(self) -> Self;
}

macro_rules! bind_now {
    ($db:ty, $args:ty, |$q:ident| $bound:expr) => {
        impl<'q> BindNow for Query<'q, $db, $args> {
            fn bind_now(self) -> Self {
                let $q = self;
                $bound
            }
        }
        impl<'q, O> BindNow for QueryAs<'q, $db, O, $args> {
            fn bind_now(self) -> Self {
                let $q = self;
                $bound
            }
        }
        impl<'q, O> BindNow for QueryScalar<'q, $db, O, $args> {
            fn bind_now(self) -> Self {
                let $q = self;
                $bound
            }
        }
    };
}

bind_now!(sqlx::Postgres, sqlx::postgres::PgArguments, |q| q);
bind_now!(sqlx::Sqlite, sqlx::sqlite::SqliteArguments, |q| q
    .bind(chrono::Utc::now()));

/// The text of a shared statement for `Backend` (see [`for_each_backend!`]):
/// `format!` arguments fill in words from [`crate::rules`], then the
/// dialect tokens are rendered. Done once per backend and statement.
macro_rules! sql {
    ($($template:tt)+) => {{
        static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        SQL.get_or_init(|| {
            <Backend as $crate::dialect::Dialect>::render(&format!($($template)+))
        })
        .as_str()
    }};
}

/// Instantiates the same items once for each backend, with `Backend` naming
/// the store type and `Db` its sqlx database. Shared rules are written once
/// inside it; a backend's own statements are reached through a trait the
/// backend implements (such as [`crate::store::WorkDialect`]).
macro_rules! for_each_backend {
    ($($items:tt)*) => {
        const _: () = {
            #[allow(unused_imports)]
            use $crate::postgres::PgStore as Backend;
            #[allow(unused_imports)]
            use sqlx::Postgres as Db;
            $($items)*
        };
        const _: () = {
            #[allow(unused_imports)]
            use $crate::sqlite::SqliteStore as Backend;
            #[allow(unused_imports)]
            use sqlx::Sqlite as Db;
            $($items)*
        };
    };
}

pub(crate) use {for_each_backend, sql};

#[cfg(test)]
mod tests {
    use super::Dialect;
    use crate::{PgStore, SqliteStore};

    const TEMPLATE: &str = "UPDATE t SET at = @now WHERE id = $2 AND seen < @ago($1) @for_update";

    #[test]
    fn tokens_render_per_dialect() {
        assert_eq!(
            PgStore::render(TEMPLATE),
            "UPDATE t SET at = now() WHERE id = $2 \
             AND seen < now() - make_interval(secs => $1) FOR UPDATE"
        );
        // The time is bound after the statement's own parameters.
        assert_eq!(
            SqliteStore::render(TEMPLATE),
            "UPDATE t SET at = $3 WHERE id = $2 AND seen < $1 "
        );
    }
}
