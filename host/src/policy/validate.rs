//! Checking a policy's answers against the contract before the host acts on them.
//!
//! A guest can return anything its types allow; the host trusts none of it. Every answer
//! is checked here and either becomes a [`Decision`] / [`RichSelection`] or is rejected as
//! malformed (the step then goes untraced and the fault is counted).

use super::bindings::{
    ExtraAttribute, GuestJourneyDecision, RichPlan, SnapshotAttributes, StepDecision,
};
use super::guest_text::sanitize;
use super::limits::{MAX_EXTRA_ATTRIBUTES, MAX_EXTRA_KEY_BYTES, MAX_EXTRA_VALUE_BYTES};

/// Extra-attribute keys that would collide with the host's own `policy.*` span attributes; they
/// become `policy.extra.<key>`.
const RESERVED_EXTRA_KEYS: &[&str] = &["name", "digest", "degraded"];

/// The span attribute key of a policy's extra attribute: `policy.<key>`, or
/// `policy.extra.<key>` for the keys the host uses itself (`name`, `digest`, `degraded`).
pub fn extra_attribute_key(key: &str) -> String {
    if RESERVED_EXTRA_KEYS.contains(&key) {
        format!("policy.extra.{key}")
    } else {
        format!("policy.{key}")
    }
}

/// A validated answer of `decide`.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub emit_batch: bool,
    pub emit_rich: bool,
    pub batch_probability: f64,
    pub rich_probability: f64,
    /// Extra attributes, keys as the policy gave them (the tracer adds the `policy.` prefix).
    pub extra: Vec<(String, String)>,
}

impl Decision {}

/// A validated answer of `decide-request`.
#[derive(Debug, Clone, PartialEq)]
pub struct JourneyAnswer {
    pub trace: bool,
    /// `sampling.journey_probability`.
    pub probability: f64,
    /// Extra attributes, keys as the policy gave them.
    pub extra: Vec<(String, String)>,
}

pub(crate) fn check_journey_decision(
    answer: GuestJourneyDecision,
) -> Result<JourneyAnswer, String> {
    check_probability("probability", answer.probability)?;
    if answer.trace && answer.probability == 0.0 {
        return Err("trace with probability 0".to_string());
    }
    Ok(JourneyAnswer {
        trace: answer.trace,
        probability: answer.probability,
        extra: check_extra(answer.extra)?,
    })
}

/// A validated answer of `plan-rich`.
#[derive(Debug, Clone, PartialEq)]
pub struct RichSelection {
    /// Indices into the request columns, each below the request count and unique.
    pub requests: Vec<u32>,
    pub attributes: SnapshotAttributes,
    pub extra: Vec<(String, String)>,
}

pub(crate) fn check_decision(answer: StepDecision) -> Result<Decision, String> {
    if answer.emit_rich && !answer.emit_batch {
        return Err("emit-rich without emit-batch".to_string());
    }
    check_probability("batch-probability", answer.batch_probability)?;
    check_probability("rich-probability", answer.rich_probability)?;
    Ok(Decision {
        emit_batch: answer.emit_batch,
        emit_rich: answer.emit_rich,
        batch_probability: answer.batch_probability,
        rich_probability: answer.rich_probability,
        extra: check_extra(answer.extra)?,
    })
}

pub(crate) fn check_rich_plan(
    answer: RichPlan,
    num_requests: usize,
) -> Result<RichSelection, String> {
    if answer.requests.len() > num_requests {
        return Err(format!(
            "plan names {} requests but only {num_requests} are running",
            answer.requests.len()
        ));
    }
    let mut seen = vec![false; num_requests];
    for &index in &answer.requests {
        let slot = seen.get_mut(index as usize).ok_or_else(|| {
            format!("request index {index} is out of range (running: {num_requests})")
        })?;
        if std::mem::replace(slot, true) {
            return Err(format!("request index {index} is named twice"));
        }
    }
    Ok(RichSelection {
        requests: answer.requests,
        attributes: answer.attributes,
        extra: check_extra(answer.extra)?,
    })
}

fn check_probability(field: &str, p: f64) -> Result<(), String> {
    if (0.0..=1.0).contains(&p) {
        Ok(())
    } else {
        Err(format!("{field} {p} is outside [0, 1]"))
    }
}

fn check_extra(extra: Vec<ExtraAttribute>) -> Result<Vec<(String, String)>, String> {
    if extra.len() > MAX_EXTRA_ATTRIBUTES {
        return Err(format!(
            "{} extra attributes (at most {MAX_EXTRA_ATTRIBUTES})",
            extra.len()
        ));
    }
    let mut seen: Vec<String> = Vec::with_capacity(extra.len());
    extra
        .into_iter()
        .map(|ExtraAttribute { key, value }| {
            if key.is_empty() || key.len() > MAX_EXTRA_KEY_BYTES {
                return Err(format!(
                    "extra attribute key of {} bytes (1 to {MAX_EXTRA_KEY_BYTES})",
                    key.len()
                ));
            }
            if !key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
            {
                return Err(format!("extra attribute key {key:?} has characters outside [A-Za-z0-9_.-]"));
            }
            if value.len() > MAX_EXTRA_VALUE_BYTES {
                return Err(format!(
                    "extra attribute `{key}` has a value of {} bytes (at most {MAX_EXTRA_VALUE_BYTES})",
                    value.len()
                ));
            }
            // `reason` twice, or `name` and `extra.name`, would be one span attribute twice.
            let attribute = extra_attribute_key(&key);
            if seen.contains(&attribute) {
                return Err(format!(
                    "extra attribute `{key}` collides with another one as `{attribute}`"
                ));
            }
            seen.push(attribute);
            Ok((key, sanitize(&value)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision() -> StepDecision {
        StepDecision {
            emit_batch: true,
            emit_rich: false,
            batch_probability: 0.5,
            rich_probability: 0.1,
            extra: vec![],
        }
    }

    #[test]
    fn accepts_a_well_formed_decision() {
        assert!(check_decision(decision()).is_ok());
    }

    #[test]
    fn rejects_rich_without_batch_and_bad_probabilities() {
        let mut d = decision();
        d.emit_batch = false;
        d.emit_rich = true;
        assert!(check_decision(d).is_err());
        for p in [f64::NAN, -0.1, 1.5, f64::INFINITY] {
            let mut d = decision();
            d.rich_probability = p;
            assert!(check_decision(d).is_err(), "{p}");
        }
    }

    #[test]
    fn bounds_extra_attributes() {
        let attr = |k: &str, v: &str| ExtraAttribute {
            key: k.into(),
            value: v.into(),
        };
        let mut d = decision();
        d.extra = (0..5).map(|i| attr(&format!("k{i}"), "v")).collect();
        assert!(check_decision(d).is_err());
        let mut d = decision();
        d.extra = vec![attr("reason", &"x".repeat(129))];
        assert!(check_decision(d).is_err());
        let mut d = decision();
        d.extra = vec![attr("bad key", "v")];
        assert!(check_decision(d).is_err());
        let mut d = decision();
        d.extra = vec![attr("reason", "kv_pressure")];
        assert_eq!(check_decision(d).unwrap().extra.len(), 1);
    }

    #[test]
    fn colliding_keys_are_malformed_and_values_are_escaped() {
        let attr = |k: &str, v: &str| ExtraAttribute {
            key: k.into(),
            value: v.into(),
        };
        for pair in [
            ["reason", "reason"],
            ["name", "extra.name"],
            ["degraded", "extra.degraded"],
        ] {
            let mut d = decision();
            d.extra = vec![attr(pair[0], "a"), attr(pair[1], "b")];
            let error = check_decision(d).unwrap_err();
            assert!(error.contains("collides"), "{pair:?}: {error}");
        }
        let mut d = decision();
        d.extra = vec![attr("name", "a"), attr("reason", "line\n\x1b[31mforged")];
        let extra = check_decision(d).unwrap().extra;
        assert_eq!(extra[1].1, "line\\n\\u{1b}[31mforged");
        assert_eq!(extra_attribute_key("name"), "policy.extra.name");
        assert_eq!(extra_attribute_key("reason"), "policy.reason");
    }

    #[test]
    fn rejects_out_of_range_duplicate_and_oversized_plans() {
        let plan = |requests: Vec<u32>| RichPlan {
            requests,
            attributes: SnapshotAttributes::all(),
            extra: vec![],
        };
        assert!(check_rich_plan(plan(vec![0, 1, 2]), 3).is_ok());
        assert!(check_rich_plan(plan(vec![3]), 3).is_err());
        assert!(check_rich_plan(plan(vec![1, 1]), 3).is_err());
        assert!(check_rich_plan(plan((0..4).collect()), 3).is_err());
        assert!(check_rich_plan(plan(vec![]), 0).is_ok());
    }
}
