//! Request journeys, the engine's half: the `llm_core` span's events, and the ticket that joins
//! one client request's decision to the server.
//!
//! A client request with journey tracing on comes with a [`JourneyTicket`] (one per HTTP
//! request, shared by its choices). When the engine thread takes in the first choice it asks the
//! step observer once ([`StepObserver::decide_journey`](super::StepObserver::decide_journey))
//! whether the journey is traced; later choices reuse that answer, so a request is traced whole or
//! not at all. A traced request carries a [`JourneyLog`]: the scheduler appends a
//! [`JourneyEvent`] at each transition (`QUEUED`, `SCHEDULED` first or resumed, `FIRST_TOKEN`,
//! `PREEMPTED`, `FINISHED`), with the request's progress and the id of the step that caused it, and
//! hands the log to the observer ([`StepObserver::on_journey_end`](super::StepObserver::on_journey_end))
//! when the request is freed. An untraced request has no log: every hook is one `None` check. The
//! server emits `llm_request` through [`JourneyTicket::when_traced`], which runs now if the
//! decision is in, later if it is not yet, and never for an untraced request.

use std::sync::{Arc, Mutex, PoisonError};

use super::request::{FinishReason, Request, RequestId, RequestPhase, RequestStatus, unix_time_ns};
use crate::splitmix::finalize;
use crate::trace_context::{SpanId, TraceId, TraceParent};

/// A traced journey: its ids and why it was traced. Shared by the request's choices.
#[derive(Debug, Clone, PartialEq)]
pub struct JourneyDecision {
    /// The caller's trace (from `traceparent`) or a new one.
    pub trace_id: TraceId,
    /// The `llm_request` span.
    pub request_span_id: SpanId,
    /// The caller's span, parent of `llm_request` (from `traceparent`).
    pub parent: Option<TraceParent>,
    /// `sampling.journey_probability`: the probability this journey had of being traced.
    pub probability: f64,
    /// Extra attributes the policy attached (key without prefix, value).
    pub extra: Vec<(String, String)>,
}

impl JourneyDecision {
    /// The `llm_core` span of engine request `request_id` (one per choice), derived from the
    /// request span so that nothing more needs to be stored or sent.
    pub fn core_span_id(&self, request_id: RequestId) -> SpanId {
        let mut id = finalize(self.request_span_id.as_u64() ^ finalize(request_id ^ CORE_SALT));
        if id == 0 {
            id = CORE_SALT;
        }
        SpanId(id.to_be_bytes())
    }
}

const CORE_SALT: u64 = 0x6c6c_6d5f_636f_7265; // "llm_core"

/// What the observer sees of a request when it decides on its journey.
#[derive(Debug, Clone, Copy)]
pub struct JourneyArrival<'a> {
    pub request_id: RequestId,
    /// The id the client knows the request by.
    pub external_id: &'a str,
    pub num_prompt_tokens: usize,
    pub max_tokens: usize,
    pub temperature: f32,
    /// Choices of the client request (`n` × prompts).
    pub num_choices: u32,
    /// The caller's `traceparent`, if it sent a valid one.
    pub parent: Option<&'a TraceParent>,
    /// Queue depths and KV usage when the request arrived.
    pub running_depth: usize,
    pub waiting_depth: usize,
    pub kv_usage_ratio: f64,
    /// The engine's last step id (0 before the first step).
    pub step_id: u64,
}

type Emit = Box<dyn FnOnce(Arc<JourneyDecision>) + Send>;

enum TicketState {
    Undecided,
    Decided(Option<Arc<JourneyDecision>>),
    /// The server finished first: what it will emit once the journey is known to be traced.
    Parked(Emit),
}

/// One client request's journey decision, shared by the server and the engine thread.
pub struct JourneyTicket {
    parent: Option<TraceParent>,
    num_choices: u32,
    state: Mutex<TicketState>,
}

impl std::fmt::Debug for JourneyTicket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JourneyTicket")
            .field("parent", &self.parent)
            .field("num_choices", &self.num_choices)
            .finish_non_exhaustive()
    }
}

impl JourneyTicket {
    pub fn new(parent: Option<TraceParent>, num_choices: u32) -> Arc<Self> {
        Arc::new(Self {
            parent,
            num_choices,
            state: Mutex::new(TicketState::Undecided),
        })
    }

    pub fn parent(&self) -> Option<&TraceParent> {
        self.parent.as_ref()
    }

    pub fn num_choices(&self) -> u32 {
        self.num_choices
    }

    /// The decision, once taken: `Some(None)` for an untraced journey.
    pub fn decision(&self) -> Option<Option<Arc<JourneyDecision>>> {
        match &*self.lock() {
            TicketState::Decided(decision) => Some(decision.clone()),
            TicketState::Undecided | TicketState::Parked(_) => None,
        }
    }

    /// Engine side: the decision, taking it with `decide` if this is the request's first
    /// choice. A server half parked meanwhile is emitted now if the journey is traced.
    pub fn decide_once(
        &self,
        decide: impl FnOnce() -> Option<JourneyDecision>,
    ) -> Option<Arc<JourneyDecision>> {
        if let TicketState::Decided(decision) = &*self.lock() {
            return decision.clone();
        }
        // Only the engine thread decides, so nobody decides in between; deciding outside the
        // lock keeps a server thread that finishes meanwhile from waiting on the policy call.
        let decision = decide().map(Arc::new);
        let previous = std::mem::replace(&mut *self.lock(), TicketState::Decided(decision.clone()));
        if let (TicketState::Parked(emit), Some(decision)) = (previous, &decision) {
            emit(Arc::clone(decision));
        }
        decision
    }

    /// Server side: runs `emit` with the decision if the journey is traced: now if the engine
    /// has decided, once it does if not; never for an untraced journey (or one the engine never
    /// took in).
    pub fn when_traced(&self, emit: impl FnOnce(Arc<JourneyDecision>) + Send + 'static) {
        let mut state = self.lock();
        match &*state {
            TicketState::Decided(Some(decision)) => {
                let decision = Arc::clone(decision);
                drop(state);
                emit(decision);
            }
            TicketState::Decided(None) => {}
            TicketState::Undecided | TicketState::Parked(_) => {
                *state = TicketState::Parked(Box::new(emit));
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TicketState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The `journey.*` events of `llm_core`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JourneyEventKind {
    /// Added to the waiting queue.
    Queued,
    /// Admitted to the running queue: for the first time, or `resume` after a preemption.
    Scheduled { resume: bool },
    /// The first output token was sampled.
    FirstToken,
    /// Its blocks were freed for another request; it waits to recompute.
    Preempted,
    /// Freed: stopped, length, aborted or error.
    Finished(FinishReason),
}

impl JourneyEventKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Queued => "journey.QUEUED",
            Self::Scheduled { .. } => "journey.SCHEDULED",
            Self::FirstToken => "journey.FIRST_TOKEN",
            Self::Preempted => "journey.PREEMPTED",
            Self::Finished(_) => "journey.FINISHED",
        }
    }
}

/// `phase` on a journey event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JourneyPhase {
    Waiting,
    Prefill,
    Decode,
}

impl JourneyPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Waiting => "WAITING",
            Self::Prefill => "PREFILL",
            Self::Decode => "DECODE",
        }
    }
}

/// One transition of a traced request, with its progress at that moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct JourneyEvent {
    pub kind: JourneyEventKind,
    /// `scheduler.step`: the step during which it happened; for what happens between steps
    /// (arrival, an abort), the next step, the first whose batch summary reflects it.
    pub step: u64,
    /// Wall clock, Unix ns (the event's time).
    pub ts_unix_ns: u64,
    /// `ts.monotonic`: `CLOCK_MONOTONIC` in ns.
    pub ts_monotonic_ns: u64,
    pub phase: JourneyPhase,
    pub prefill_done_tokens: u32,
    pub prefill_total_tokens: u32,
    pub decode_done_tokens: u32,
    pub decode_max_tokens: u32,
    pub num_preemptions: u32,
}

/// A traced request's `llm_core`: its ids and events, handed to the observer when it is freed.
#[derive(Debug, Clone, PartialEq)]
pub struct JourneyLog {
    pub decision: Arc<JourneyDecision>,
    pub core_span_id: SpanId,
    /// The id the client knows the request by.
    pub request_id: Arc<str>,
    pub events: Vec<JourneyEvent>,
}

impl JourneyLog {
    pub fn new(decision: Arc<JourneyDecision>, request: &Request) -> Self {
        Self {
            core_span_id: decision.core_span_id(request.id()),
            decision,
            request_id: Arc::clone(request.external_id()),
            events: Vec::with_capacity(6),
        }
    }
}

/// `CLOCK_MONOTONIC` now, in ns.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC is always supported on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

impl Request {
    /// Appends a journey event if the request is traced (a `None` check otherwise).
    #[inline]
    pub(super) fn journey_event(&mut self, kind: JourneyEventKind, step: u64) {
        if self.journey.is_some() {
            self.push_journey_event(kind, step);
        }
    }

    #[cold]
    fn push_journey_event(&mut self, kind: JourneyEventKind, step: u64) {
        let phase = match (kind, self.status) {
            (JourneyEventKind::Queued, _)
            | (_, RequestStatus::Waiting | RequestStatus::Preempted) => JourneyPhase::Waiting,
            _ => match self.phase() {
                RequestPhase::Prefill => JourneyPhase::Prefill,
                RequestPhase::Decode => JourneyPhase::Decode,
            },
        };
        let sat = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
        let event = JourneyEvent {
            kind,
            step,
            ts_unix_ns: unix_time_ns(),
            ts_monotonic_ns: monotonic_ns(),
            phase,
            prefill_done_tokens: sat(self.num_computed_tokens.min(self.num_prompt_tokens)),
            prefill_total_tokens: sat(self.num_prompt_tokens),
            decode_done_tokens: sat(self.num_output_tokens()),
            decode_max_tokens: sat(self.params.max_tokens),
            num_preemptions: self.num_preemptions,
        };
        if let Some(log) = self.journey.as_deref_mut() {
            log.events.push(event);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn decision() -> JourneyDecision {
        JourneyDecision {
            trace_id: TraceId([1; 16]),
            request_span_id: SpanId([2; 8]),
            parent: None,
            probability: 1.0,
            extra: Vec::new(),
        }
    }

    #[test]
    fn the_first_choice_decides_for_all() {
        let ticket = JourneyTicket::new(None, 2);
        let calls = AtomicUsize::new(0);
        let decide = || {
            calls.fetch_add(1, Ordering::Relaxed);
            Some(decision())
        };
        let first = ticket.decide_once(decide);
        let second = ticket.decide_once(|| {
            calls.fetch_add(1, Ordering::Relaxed);
            None
        });
        assert_eq!(calls.load(Ordering::Relaxed), 1);
        assert_eq!(first, second);
        let d = first.unwrap();
        assert_ne!(d.core_span_id(1), d.core_span_id(2));
        assert!(d.core_span_id(1).is_valid());
    }

    #[test]
    fn the_server_half_runs_once_and_only_when_traced() {
        let emitted = Arc::new(AtomicUsize::new(0));
        let count = |emitted: &Arc<AtomicUsize>| {
            let emitted = Arc::clone(emitted);
            move |_: Arc<JourneyDecision>| {
                emitted.fetch_add(1, Ordering::Relaxed);
            }
        };
        // Decided first, then the server finishes.
        let traced = JourneyTicket::new(None, 1);
        traced.decide_once(|| Some(decision()));
        traced.when_traced(count(&emitted));
        assert_eq!(emitted.load(Ordering::Relaxed), 1);
        // The server finishes first (a client gone before the engine took the request in).
        let parked = JourneyTicket::new(None, 1);
        parked.when_traced(count(&emitted));
        assert_eq!(emitted.load(Ordering::Relaxed), 1);
        parked.decide_once(|| Some(decision()));
        assert_eq!(emitted.load(Ordering::Relaxed), 2);
        // Untraced, in either order.
        let untraced = JourneyTicket::new(None, 1);
        untraced.decide_once(|| None);
        untraced.when_traced(count(&emitted));
        let parked_untraced = JourneyTicket::new(None, 1);
        parked_untraced.when_traced(count(&emitted));
        parked_untraced.decide_once(|| None);
        assert_eq!(emitted.load(Ordering::Relaxed), 2);
        assert_eq!(untraced.decision(), Some(None));
    }

    #[test]
    fn the_monotonic_clock_moves_forward() {
        let a = monotonic_ns();
        let b = monotonic_ns();
        assert!(a > 0 && b >= a);
    }
}
