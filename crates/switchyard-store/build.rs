//! `sqlx::migrate!` embeds the migration files at compile time; rebuild when
//! they change so the embedded checksums never go stale.
fn main() {
    println!("cargo:rerun-if-changed=../../migrations/postgres");
    println!("cargo:rerun-if-changed=../../migrations/sqlite");
}
