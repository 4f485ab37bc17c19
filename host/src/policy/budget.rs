//! A policy's share of the step, bounded: when a policy is slow, the built-in default takes over.
//!
//! A policy that never faults can still be slow: a busy loop that stays under its fuel and its
//! deadline adds its whole cost to every step. [`StepBudget`] watches what the policy's calls
//! cost per step (`decide` plus `plan-rich`, wall time) and decides, step by step, who answers:
//!
//! - **Budget.** `max(floor, share × median engine step)`, where the engine step is the previous
//!   whole step minus the policy's part of it (median of the last [`ENGINE_WINDOW`] steps,
//!   computed after 1, 2, 4, … 32 steps, then every [`ENGINE_WINDOW`] steps; with a share, no
//!   policy is judged before the first one). With the defaults (250 µs, 0.2) a policy may take
//!   a fifth of what the engine itself takes per step, and never less than 250 µs.
//! - **Cost.** What the policy's calls took this step, in wall time, which is cheap to read;
//!   but a call that was merely descheduled on a busy machine looks slow in wall time. So once a
//!   step's wall cost passes the budget, the next [`SUSPECT_STEPS`] steps (and every probe) are
//!   also timed in the engine thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`, ~0.5 µs per read,
//!   too dear for every step), and only CPU time counts against the budget. A wall-time outlier
//!   alone never does.
//! - **Degrade.** When the p99 of the policy's cost over its last [`COST_WINDOW`] steps exceeds
//!   the budget — counted as at least [`MIN_OVER_BUDGET`] steps over it in the window — the
//!   policy is *degraded*: the
//!   built-in default policy (same sampling rates) answers the following steps, and those spans
//!   carry `policy.degraded = true`.
//! - **Probe and recover.** While degraded, the policy still answers one step in
//!   [`PROBE_EVERY`] (0.1% of the steps, so the step-time p99 does not see it). After
//!   [`PROBES_TO_RECOVER`] probes in a row within budget it is trusted again. A hot swap starts
//!   a fresh budget.
//!
//! Both transitions are logged and counted in `/metrics`. Nothing here calls a policy: the
//! tracer asks [`StepBudget::route`] before the step and reports the cost with
//! [`StepBudget::record`] after it.

use std::time::Duration;

/// Steps of policy cost the p99 is taken over.
pub const COST_WINDOW: usize = 256;
/// Over-budget steps in the window that degrade a policy (at least; the p99 rule may ask more).
pub const MIN_OVER_BUDGET: usize = 3;
/// Engine step times the median is taken over (and how often it is refreshed).
pub const ENGINE_WINDOW: usize = 64;
/// While degraded, the policy answers one step in this many.
pub const PROBE_EVERY: u64 = 1024;
/// Probes in a row within budget that end a degradation.
pub const PROBES_TO_RECOVER: u32 = 4;
/// Steps timed in CPU time after a step whose wall cost passed the budget.
pub const SUSPECT_STEPS: u32 = 16;

/// The calling thread's CPU time (`None` where the platform cannot tell).
pub fn thread_cpu_time() -> Option<Duration> {
    #[cfg(unix)]
    {
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `now` is a valid, writable timespec for the duration of the call.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
        if rc == 0 {
            return Some(Duration::new(
                u64::try_from(now.tv_sec).ok()?,
                u32::try_from(now.tv_nsec).ok()?,
            ));
        }
    }
    None
}

/// The budget's settings (`--step-tracing-policy-budget-us`, `…-budget-share`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BudgetConfig {
    /// The smallest budget per step.
    pub floor: Duration,
    /// The budget as a share of the median engine step (0 for the floor alone).
    pub share: f64,
}

impl BudgetConfig {
    /// Default floor, in microseconds.
    pub const DEFAULT_FLOOR_US: u64 = 250;
    /// Default share of the engine step.
    pub const DEFAULT_SHARE: f64 = 0.2;

    /// No budget: the policy answers every step, however slow.
    pub const OFF: BudgetConfig = BudgetConfig {
        floor: Duration::ZERO,
        share: 0.0,
    };

    pub fn is_off(&self) -> bool {
        self.floor.is_zero() && self.share <= 0.0
    }
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            floor: Duration::from_micros(Self::DEFAULT_FLOOR_US),
            share: Self::DEFAULT_SHARE,
        }
    }
}

/// Who answers a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The policy, in good standing.
    Policy,
    /// The policy, degraded, answering one of its probe steps.
    Probe,
    /// The built-in default, standing in for a degraded policy.
    Fallback,
}

/// A change of standing, for the log and the metrics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Transition {
    /// The policy's p99 cost passed the budget.
    Degraded { p99: Duration, budget: Duration },
    /// Enough probes in a row were within budget.
    Recovered { budget: Duration },
}

/// The per-policy state of the budget (see the module doc).
#[derive(Debug, Clone)]
pub struct StepBudget {
    config: BudgetConfig,
    /// Policy cost per step, µs, a ring of up to [`COST_WINDOW`].
    costs: Vec<u32>,
    next_cost: usize,
    /// Entries of `costs` above `budget_us`.
    over: usize,
    /// Engine step times, µs, a ring of [`ENGINE_WINDOW`].
    engine_steps: Vec<u32>,
    next_engine_step: usize,
    /// What the policy took in the previous step, µs (subtracted from that step's duration).
    previous_cost_us: u64,
    budget_us: u32,
    /// Whether `budget_us` reflects engine steps yet (always, without a share).
    calibrated: bool,
    degraded: bool,
    /// Steps routed since the policy was degraded (the probe schedule).
    since_degraded: u64,
    good_probes: u32,
    /// Steps still to be timed in CPU time after a wall-time outlier.
    suspect_left: u32,
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

impl StepBudget {
    pub fn new(config: BudgetConfig) -> Self {
        Self {
            config,
            costs: Vec::with_capacity(COST_WINDOW),
            next_cost: 0,
            over: 0,
            engine_steps: Vec::with_capacity(ENGINE_WINDOW),
            next_engine_step: 0,
            previous_cost_us: 0,
            budget_us: micros(config.floor),
            calibrated: config.share <= 0.0,
            degraded: false,
            since_degraded: 0,
            good_probes: 0,
            suspect_left: 0,
        }
    }

    /// Whether the coming step's cost should also be read in CPU time (see the module doc).
    pub fn wants_cpu_time(&self) -> bool {
        !self.config.is_off() && (self.suspect_left > 0 || self.degraded)
    }

    pub fn config(&self) -> BudgetConfig {
        self.config
    }

    /// The budget per step now.
    pub fn budget(&self) -> Duration {
        Duration::from_micros(u64::from(self.budget_us))
    }

    pub fn is_degraded(&self) -> bool {
        self.degraded
    }

    /// Who answers the next step; `last_step_duration_us` is the previous whole step's wall
    /// time (the summary's `last-step-duration-us`).
    pub fn route(&mut self, last_step_duration_us: u64) -> Route {
        if self.config.is_off() {
            return Route::Policy;
        }
        if last_step_duration_us > 0 {
            let engine_us = last_step_duration_us.saturating_sub(self.previous_cost_us);
            self.push_engine_step(u32::try_from(engine_us).unwrap_or(u32::MAX));
        }
        self.previous_cost_us = 0;
        if !self.degraded {
            return Route::Policy;
        }
        self.since_degraded += 1;
        if self.since_degraded.is_multiple_of(PROBE_EVERY) {
            Route::Probe
        } else {
            Route::Fallback
        }
    }

    /// What the policy's calls cost in a step it answered (`route` said Policy or Probe, and at
    /// least one call was made): their wall time, and their CPU time when
    /// [`wants_cpu_time`](Self::wants_cpu_time) said so (and the platform could tell).
    pub fn record(
        &mut self,
        route: Route,
        wall: Duration,
        cpu: Option<Duration>,
    ) -> Option<Transition> {
        if self.config.is_off() || route == Route::Fallback {
            return None;
        }
        self.previous_cost_us = u64::from(micros(wall));
        self.suspect_left = self.suspect_left.saturating_sub(1);
        let cost_us = match cpu {
            Some(cpu) => micros(cpu),
            None if micros(wall) > self.budget_us => {
                // Slow, or only descheduled: the next steps are timed in CPU time to tell.
                self.suspect_left = SUSPECT_STEPS;
                if route == Route::Probe {
                    self.good_probes = 0;
                }
                return None;
            }
            None => micros(wall),
        };
        if route == Route::Probe {
            if cost_us > self.budget_us {
                self.good_probes = 0;
                return None;
            }
            self.good_probes += 1;
            if self.good_probes < PROBES_TO_RECOVER {
                return None;
            }
            self.degraded = false;
            self.good_probes = 0;
            self.clear_costs();
            return Some(Transition::Recovered {
                budget: self.budget(),
            });
        }
        self.push_cost(cost_us);
        if self.calibrated && self.over >= self.over_needed() {
            self.degraded = true;
            self.since_degraded = 0;
            self.good_probes = 0;
            let p99 = self.p99();
            self.clear_costs();
            return Some(Transition::Degraded {
                p99,
                budget: self.budget(),
            });
        }
        None
    }

    /// Over-budget entries that put the window's p99 (nearest rank) over the budget.
    fn over_needed(&self) -> usize {
        let n = self.costs.len();
        let rank = (n * 99).div_ceil(100);
        (n - rank + 1).max(MIN_OVER_BUDGET)
    }

    fn p99(&self) -> Duration {
        let mut sorted = self.costs.clone();
        sorted.sort_unstable();
        let rank = (sorted.len() * 99).div_ceil(100).max(1);
        Duration::from_micros(u64::from(sorted.get(rank - 1).copied().unwrap_or(0)))
    }

    fn push_cost(&mut self, cost_us: u32) {
        if self.costs.len() < COST_WINDOW {
            self.costs.push(cost_us);
        } else {
            let old = std::mem::replace(&mut self.costs[self.next_cost], cost_us);
            if old > self.budget_us {
                self.over -= 1;
            }
            self.next_cost = (self.next_cost + 1) % COST_WINDOW;
        }
        if cost_us > self.budget_us {
            self.over += 1;
        }
    }

    fn clear_costs(&mut self) {
        self.costs.clear();
        self.next_cost = 0;
        self.over = 0;
    }

    fn push_engine_step(&mut self, engine_us: u32) {
        if self.engine_steps.len() < ENGINE_WINDOW {
            self.engine_steps.push(engine_us);
        } else {
            self.engine_steps[self.next_engine_step] = engine_us;
        }
        self.next_engine_step = (self.next_engine_step + 1) % ENGINE_WINDOW;
        let warming_up = matches!(self.engine_steps.len(), 1 | 2 | 4 | 8 | 16 | 32)
            && self.next_engine_step == self.engine_steps.len();
        if self.next_engine_step == 0 || warming_up {
            self.refresh_budget();
        }
    }

    /// Recomputes the budget from the engine steps' median, and the over-budget count with it.
    fn refresh_budget(&mut self) {
        let mut sorted = self.engine_steps.clone();
        sorted.sort_unstable();
        let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0);
        let share_us = (f64::from(median) * self.config.share).min(f64::from(u32::MAX)) as u32;
        self.budget_us = micros(self.config.floor).max(share_us);
        self.calibrated = true;
        self.over = self.costs.iter().filter(|&&c| c > self.budget_us).count();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: fn(u64) -> Duration = Duration::from_micros;

    fn budget(floor_us: u64, share: f64) -> StepBudget {
        StepBudget::new(BudgetConfig {
            floor: US(floor_us),
            share,
        })
    }

    /// Runs `steps` steps of an engine taking `engine_us` with a policy costing `cost_us`;
    /// returns the routes and transitions seen.
    fn run(
        b: &mut StepBudget,
        steps: u64,
        engine_us: u64,
        cost_us: u64,
    ) -> (Vec<Route>, Vec<Transition>) {
        let mut routes = Vec::new();
        let mut transitions = Vec::new();
        let mut last = 0;
        for _ in 0..steps {
            let route = b.route(last);
            routes.push(route);
            let cost = if route == Route::Fallback { 1 } else { cost_us };
            // As the tracer does: CPU time only when asked for (here equal to the wall time).
            let cpu = b.wants_cpu_time().then_some(US(cost));
            transitions.extend(b.record(route, US(cost), cpu));
            last = engine_us + cost;
        }
        (routes, transitions)
    }

    #[test]
    fn a_fast_policy_keeps_every_step() {
        let mut b = budget(250, 0.2);
        let (routes, transitions) = run(&mut b, 10_000, 1_500, 5);
        assert!(routes.iter().all(|&r| r == Route::Policy));
        assert!(transitions.is_empty());
        assert_eq!(b.budget(), US(300), "0.2 × the 1.5 ms engine step");
    }

    #[test]
    fn descheduled_calls_do_not_degrade_but_a_slow_policy_does_within_four_steps() {
        let mut b = budget(250, 0.0);
        // A fast policy descheduled every 10th step: 5 ms of wall time, 5 µs of CPU time.
        for step in 1..=1_000u64 {
            let route = b.route(1_000);
            let wall = if step % 10 == 0 { 5_000 } else { 5 };
            let cpu = b.wants_cpu_time().then_some(US(5));
            assert_eq!(b.record(route, US(wall), cpu), None, "step {step}");
        }
        // Quiet again long enough for the suspicion to lapse.
        run(&mut b, u64::from(SUSPECT_STEPS), 1_000, 5);
        // Truly slow (CPU time too): set aside on its fourth step, the first one only raising
        // the suspicion that the next three confirm.
        let (routes, transitions) = run(&mut b, 4, 1_000, 1_200);
        assert_eq!(routes, [Route::Policy; 4]);
        assert!(matches!(
            transitions[..],
            [Transition::Degraded { p99, budget }] if p99 == US(1_200) && budget == US(250)
        ));
        assert!(b.is_degraded());
    }

    #[test]
    fn a_degraded_policy_is_probed_rarely_and_recovers_after_good_probes() {
        let mut b = budget(250, 0.0);
        run(&mut b, 4, 1_000, 2_000);
        assert!(b.is_degraded());
        // Still slow: probed once every PROBE_EVERY steps only, never recovers.
        let (routes, transitions) = run(&mut b, 10 * PROBE_EVERY, 1_000, 2_000);
        let probes: Vec<usize> = (0..routes.len())
            .filter(|&i| routes[i] == Route::Probe)
            .collect();
        assert_eq!(probes.len(), 10);
        assert!(
            probes
                .iter()
                .all(|&i| (i as u64 + 1).is_multiple_of(PROBE_EVERY))
        );
        assert!(routes.iter().all(|&r| r != Route::Policy));
        assert!(transitions.is_empty());
        // Fast again: recovers after PROBES_TO_RECOVER probes in a row.
        let (_, transitions) = run(&mut b, u64::from(PROBES_TO_RECOVER) * PROBE_EVERY, 1_000, 5);
        assert!(matches!(transitions[..], [Transition::Recovered { .. }]));
        assert!(!b.is_degraded());
        assert_eq!(b.route(1_000), Route::Policy);
    }

    #[test]
    fn the_budget_follows_the_engine_step_without_the_policys_part() {
        // A 40 ms engine step allows an 8 ms policy at share 0.2: a 1.2 ms policy stays.
        let mut b = budget(250, 0.2);
        let (_, transitions) = run(&mut b, 1_000, 40_000, 1_200);
        assert!(transitions.is_empty());
        assert_eq!(b.budget(), US(8_000));
        // A 1.5 ms engine step allows 300 µs: the same policy is degraded within a few steps
        // (its own 1.2 ms is not counted as engine time).
        let mut b = budget(250, 0.2);
        let (routes, transitions) = run(&mut b, 1_000, 1_500, 1_200);
        assert!(matches!(
            transitions[..],
            [Transition::Degraded { budget, .. }] if budget == US(300)
        ));
        let answered = routes.iter().take_while(|&&r| r == Route::Policy).count();
        assert!(answered <= 4, "degraded after {answered} steps");
        assert_eq!(b.budget(), US(300));
    }

    #[test]
    fn off_means_the_policy_answers_every_step() {
        let mut b = StepBudget::new(BudgetConfig::OFF);
        let (routes, transitions) = run(&mut b, 2_000, 1_000, 50_000);
        assert!(routes.iter().all(|&r| r == Route::Policy));
        assert!(transitions.is_empty());
    }
}
