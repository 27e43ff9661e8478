//! Percentiles and the replicas' `/metrics`.

use std::time::Duration;

/// Nearest-rank percentile of sorted samples, in milliseconds.
pub(crate) fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    let index = rank.clamp(1, sorted.len()) - 1;
    sorted[index].as_secs_f64() * 1e3
}

/// The metric samples the bench reads, summed over replicas.
#[derive(Clone, Debug, Default)]
pub(crate) struct Scrape {
    pub(crate) notifications_sent: f64,
    pub(crate) notifications_received: f64,
    pub(crate) drain_count: f64,
    pub(crate) drain_sum: f64,
    pub(crate) messages_delivered: f64,
    pub(crate) route_local: f64,
    pub(crate) route_forward: f64,
    pub(crate) route_queued: f64,
    pub(crate) intent_count: f64,
    pub(crate) intent_sum: f64,
}

impl Scrape {
    pub(crate) fn add_text(&mut self, text: &str) {
        for line in text.lines() {
            if line.starts_with('#') {
                continue;
            }
            let Some((name, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let slot = match name {
                "switchyard_notifications_sent_total" => &mut self.notifications_sent,
                "switchyard_notifications_received_total" => &mut self.notifications_received,
                "switchyard_drain_duration_seconds_count" => &mut self.drain_count,
                "switchyard_drain_duration_seconds_sum" => &mut self.drain_sum,
                "switchyard_messages_delivered_total" => &mut self.messages_delivered,
                "switchyard_routes_total{route=\"local\"}" => &mut self.route_local,
                "switchyard_routes_total{route=\"forward\"}" => &mut self.route_forward,
                "switchyard_routes_total{route=\"queued\"}" => &mut self.route_queued,
                "switchyard_intent_to_done_seconds_count" => &mut self.intent_count,
                "switchyard_intent_to_done_seconds_sum" => &mut self.intent_sum,
                _ => continue,
            };
            *slot += value;
        }
    }

    /// `self - before`, field by field.
    pub(crate) fn since(&self, before: &Scrape) -> Scrape {
        Scrape {
            notifications_sent: self.notifications_sent - before.notifications_sent,
            notifications_received: self.notifications_received - before.notifications_received,
            drain_count: self.drain_count - before.drain_count,
            drain_sum: self.drain_sum - before.drain_sum,
            messages_delivered: self.messages_delivered - before.messages_delivered,
            route_local: self.route_local - before.route_local,
            route_forward: self.route_forward - before.route_forward,
            route_queued: self.route_queued - before.route_queued,
            intent_count: self.intent_count - before.intent_count,
            intent_sum: self.intent_sum - before.intent_sum,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile_ms(&samples, 50.0), 50.0);
        assert_eq!(percentile_ms(&samples, 99.0), 99.0);
        assert_eq!(percentile_ms(&samples[..1], 99.0), 1.0);
    }

    #[test]
    fn scrape_sums_named_samples() {
        let mut s = Scrape::default();
        s.add_text("# HELP x\nswitchyard_notifications_sent_total 3\nswitchyard_routes_total{route=\"forward\"} 2\n");
        s.add_text("switchyard_notifications_sent_total 4\n");
        assert_eq!(s.notifications_sent, 7.0);
        assert_eq!(s.route_forward, 2.0);
    }
}
