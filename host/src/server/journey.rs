//! Request journeys, the server's half: the moments of `llm_request` and the body that marks its
//! last byte.
//!
//! With journey tracing on, [`ServerJourney::begin`] notes the arrival and reads the caller's
//! `traceparent`/`tracestate`. When the choices are submitted the journey hands the engine one
//! [`JourneyTicket`] (its first choice decides, on the engine thread, whether the journey is
//! traced) and notes the hand-off; each choice notes the first output it receives and, at its end,
//! its token counts and queue time. The answer's body is wrapped ([`ServerJourney::wrap`]) so the
//! journey ends `api.DEPARTED` when its last frame goes out, or `api.ABORTED` when the body is
//! dropped before that (the client went away) or the answer is an error. At the end the
//! `llm_request` half goes to the tracer through [`JourneyTicket::when_traced`]: only for a traced
//! journey, and, if the engine has not decided yet, once it does. Nothing is recorded or sent for
//! a request whose journey is not traced beyond these few timestamps.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use axum::body::{Body, Bytes, HttpBody};
use axum::http::HeaderMap;
use axum::response::Response;
use http_body::{Frame, SizeHint};

use crate::engine::journey::JourneyTicket;
use crate::step_tracing::{JourneySink, RequestInfo, RequestOutcome, RequestSpanRecord, Stamp};
use crate::trace_context::TraceParent;

use super::openai_types::Usage;

#[derive(Default)]
struct Moments {
    info: Option<RequestInfo>,
    ticket: Option<Arc<JourneyTicket>>,
    handoff: Option<Stamp>,
    first_response: Option<Stamp>,
    input_tokens: u64,
    output_tokens: u64,
    queue_time_s: Option<f64>,
    ended: bool,
}

struct Shared {
    sink: JourneySink,
    parent: Option<TraceParent>,
    arrived: Stamp,
    moments: Mutex<Moments>,
}

/// One client request's journey on the server (cheap to clone: its choices share it).
#[derive(Clone)]
pub struct ServerJourney {
    shared: Arc<Shared>,
}

impl ServerJourney {
    /// A journey for a request that just arrived, when journey tracing is on (`sink`).
    pub fn begin(sink: Option<&JourneySink>, headers: &HeaderMap) -> Option<Self> {
        let sink = sink?.clone();
        let arrived = Stamp::now();
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let parent =
            header("traceparent").and_then(|tp| TraceParent::parse(tp, header("tracestate")));
        Some(Self {
            shared: Arc::new(Shared {
                sink,
                parent,
                arrived,
                moments: Mutex::default(),
            }),
        })
    }

    fn moments(&self) -> std::sync::MutexGuard<'_, Moments> {
        self.shared
            .moments
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets what `llm_request` says of the request.
    pub fn describe(&self, info: RequestInfo) {
        self.moments().info = Some(info);
    }

    /// The ticket the request's `num_choices` choices take to the engine (made once).
    pub fn ticket(&self, num_choices: usize) -> Arc<JourneyTicket> {
        let mut moments = self.moments();
        let parent = self.shared.parent.clone();
        let choices = u32::try_from(num_choices).unwrap_or(u32::MAX);
        Arc::clone(
            moments
                .ticket
                .get_or_insert_with(|| JourneyTicket::new(parent, choices)),
        )
    }

    /// `api.HANDOFF_TO_CORE`: the first choice was submitted.
    pub fn handed_off(&self) {
        self.moments().handoff.get_or_insert_with(Stamp::now);
    }

    /// `api.FIRST_RESPONSE_FROM_CORE`: a choice received its first output.
    pub fn first_response(&self) {
        self.moments().first_response.get_or_insert_with(Stamp::now);
    }

    /// A choice ended with `usage` (its prompt counted once per prompt) after waiting
    /// `queue_time` in the engine.
    pub fn choice_ended(&self, counts_prompt: bool, usage: &Usage, queue_time: Option<f64>) {
        let mut moments = self.moments();
        if counts_prompt {
            moments.input_tokens += usage.prompt_tokens as u64;
        }
        moments.output_tokens += usage.completion_tokens as u64;
        if let Some(queue) = queue_time {
            moments.queue_time_s = Some(moments.queue_time_s.map_or(queue, |q: f64| q.max(queue)));
        }
    }

    /// Ends the journey (once): `llm_request` goes to the tracer if the journey is traced.
    pub fn end(&self, outcome: RequestOutcome) {
        let end = Stamp::now();
        let mut moments = self.moments();
        if moments.ended {
            return;
        }
        moments.ended = true;
        let Some(ticket) = moments.ticket.take() else {
            // Refused before any choice reached the engine: no journey.
            return;
        };
        let record = RequestSpanRecord {
            info: moments.info.take().unwrap_or_default(),
            input_tokens: moments.input_tokens,
            output_tokens: moments.output_tokens,
            queue_time_s: moments.queue_time_s,
            arrived: self.shared.arrived,
            handoff: moments.handoff,
            first_response: moments.first_response,
            end,
            outcome,
        };
        drop(moments);
        let sink = self.shared.sink.clone();
        ticket.when_traced(move |decision| sink.send(decision, record));
    }

    /// The answer, its body wrapped so the journey ends when the last frame is out (an error
    /// answer ends it `api.ABORTED` at once).
    pub fn wrap(self, response: Response) -> Response {
        let status = response.status();
        if status.is_client_error() || status.is_server_error() {
            self.end(RequestOutcome::Aborted(format!("answered {status}")));
            return response;
        }
        response.map(|inner| {
            Body::new(JourneyBody {
                inner,
                journey: Some(self),
            })
        })
    }
}

/// A response body that ends its journey when its last frame is out, or as aborted when it is
/// dropped before (the client went away).
struct JourneyBody {
    inner: Body,
    journey: Option<ServerJourney>,
}

impl HttpBody for JourneyBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        let outcome = match &polled {
            Poll::Ready(None) => Some(RequestOutcome::Departed),
            Poll::Ready(Some(Err(error))) => Some(RequestOutcome::Aborted(error.to_string())),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => {
                Some(RequestOutcome::Departed)
            }
            _ => None,
        };
        if let Some(outcome) = outcome
            && let Some(journey) = this.journey.take()
        {
            journey.end(outcome);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for JourneyBody {
    fn drop(&mut self) {
        if let Some(journey) = self.journey.take() {
            journey.end(RequestOutcome::Aborted("client disconnected".into()));
        }
    }
}
