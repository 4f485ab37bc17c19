//! What a policy is configured with, typed until the `configure` call.
//!
//! The step-tracing rates travel as numbers and the user's `key=value` arguments as pairs, from
//! the command line (or a hot swap) to the tracer. Only [`PolicyParams::to_configure`], called
//! where an instance is configured, turns them into the string list the WIT `configure`
//! takes: `sample_rate`, `rich_subsample_rate`, `journey_sample_rate` (contract 0.2 only), then
//! the arguments (which may override them).
//! A hot swap replaces the arguments and keeps the rates ([`PolicyParams::with_args`]); the
//! built-in default standing in for a degraded policy gets the rates alone
//! ([`PolicyParams::rates_only`]).

/// The `configure` key of the batch sample rate.
pub const SAMPLE_RATE_KEY: &str = "sample_rate";
/// The `configure` key of the rich subsample rate.
pub const RICH_SUBSAMPLE_RATE_KEY: &str = "rich_subsample_rate";
/// The `configure` key of the journey sample rate (sent to 0.2 components only).
pub const JOURNEY_SAMPLE_RATE_KEY: &str = "journey_sample_rate";

/// A policy's configuration: the two rates and the `key=value` arguments, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyParams {
    /// `--step-tracing-sample-rate`: probability that a step is batch-sampled.
    pub sample_rate: f64,
    /// `--step-tracing-rich-subsample-rate`: probability that a batch-sampled step is rich.
    pub rich_subsample_rate: f64,
    /// `--journey-tracing-sample-rate`: probability that a request's journey is traced.
    pub journey_sample_rate: f64,
    /// `--step-tracing-policy-arg key=value`, in order.
    pub args: Vec<(String, String)>,
}

impl Default for PolicyParams {
    /// The serving defaults (0.01 / 0.001), no arguments.
    fn default() -> Self {
        Self::rates(0.01, 0.001)
    }
}

impl PolicyParams {
    /// The given rates, no arguments.
    pub fn rates(sample_rate: f64, rich_subsample_rate: f64) -> Self {
        Self {
            sample_rate,
            rich_subsample_rate,
            journey_sample_rate: 1.0,
            args: Vec::new(),
        }
    }

    /// These rates with `args` instead of the current arguments.
    pub fn with_args(&self, args: &[(String, String)]) -> Self {
        Self {
            args: args.to_vec(),
            ..self.rates_only()
        }
    }

    /// These rates, no arguments.
    pub fn rates_only(&self) -> Self {
        Self {
            journey_sample_rate: self.journey_sample_rate,
            ..Self::rates(self.sample_rate, self.rich_subsample_rate)
        }
    }

    /// The list `configure` receives: the three rates first, then the arguments. (A 0.1
    /// component is not given `journey_sample_rate`: see [`for_contract_v01`].)
    pub fn to_configure(&self) -> Vec<(String, String)> {
        let mut params = Vec::with_capacity(3 + self.args.len());
        params.push((SAMPLE_RATE_KEY.to_string(), self.sample_rate.to_string()));
        params.push((
            RICH_SUBSAMPLE_RATE_KEY.to_string(),
            self.rich_subsample_rate.to_string(),
        ));
        params.push((
            JOURNEY_SAMPLE_RATE_KEY.to_string(),
            self.journey_sample_rate.to_string(),
        ));
        params.extend(self.args.iter().cloned());
        params
    }
}

/// A `configure` list for a 0.1 component: without the host-added `journey_sample_rate`, which
/// 0.1 did not define (the host decides a 0.1 policy's journeys itself). A user's own
/// `journey_sample_rate=` argument, after the rates, is kept.
pub fn for_contract_v01(params: &[(String, String)]) -> Vec<(String, String)> {
    let mut out = params.to_vec();
    if let Some(pos) = out
        .iter()
        .take(3)
        .position(|(k, _)| k == JOURNEY_SAMPLE_RATE_KEY)
    {
        out.remove(pos);
    }
    out
}

/// Parses `key=value` (the form of `--step-tracing-policy-arg` and the admin API's `arg=`).
pub fn parse_key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => {
            Ok((key.trim().to_string(), value.to_string()))
        }
        _ => Err(format!("`{text}` is not of the form key=value")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_come_first_and_args_follow_in_order() {
        let params = PolicyParams {
            args: vec![("k".into(), "v".into()), ("sample_rate".into(), "1".into())],
            ..PolicyParams::rates(0.5, 0.25)
        };
        let list = params.to_configure();
        let keys: Vec<&str> = list.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "sample_rate",
                "rich_subsample_rate",
                "journey_sample_rate",
                "k",
                "sample_rate"
            ]
        );
        assert_eq!(
            (list[0].1.as_str(), list[1].1.as_str(), list[2].1.as_str()),
            ("0.5", "0.25", "1")
        );
        let old: Vec<String> = for_contract_v01(&list)
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(
            old,
            ["sample_rate", "rich_subsample_rate", "k", "sample_rate"]
        );
    }

    #[test]
    fn a_swap_keeps_the_rates_and_replaces_the_args() {
        let server = PolicyParams {
            args: vec![("kv_usage_threshold".into(), "0.9".into())],
            ..PolicyParams::rates(0.3, 0.0)
        };
        let swapped = server.with_args(&[("rich_top_k".into(), "4".into())]);
        assert_eq!(swapped.args, [("rich_top_k".to_string(), "4".to_string())]);
        assert_eq!(
            (swapped.sample_rate, swapped.rich_subsample_rate),
            (0.3, 0.0)
        );
        assert_eq!(server.rates_only().args, []);
    }

    #[test]
    fn key_value_pairs_parse_or_say_why_not() {
        assert_eq!(parse_key_value(" a =b=c"), Ok(("a".into(), "b=c".into())));
        assert_eq!(parse_key_value("a="), Ok(("a".into(), String::new())));
        assert!(parse_key_value("=b").is_err());
        assert!(parse_key_value("ab").is_err());
    }
}
