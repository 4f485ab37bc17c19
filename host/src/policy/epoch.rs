//! The wasmtime engines policies run on, and the ticker that gives them a wall clock.
//!
//! Every policy component is compiled and run on one of two process-wide engines (with or
//! without fuel metering), both with epoch interruption on. A background thread advances their
//! epoch every [`EPOCH_TICK`]; a store's deadline is a number of ticks from the start of a call
//! ([`deadline_ticks`]), after which the guest traps with [`wasmtime::Trap::Interrupt`] at its
//! next loop back-edge or function entry. Host calls cannot be interrupted, which is why the
//! sandbox makes every host call short and non-blocking (see [`super::wasi`]).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Duration;

use wasmtime::{Config, Engine};

/// How often the epoch advances.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// The shared engines, by whether fuel is metered.
static ENGINES: OnceLock<Mutex<HashMap<bool, Engine>>> = OnceLock::new();

/// The engine for policies, with fuel metering when `fuel` is set; starts the ticker the first
/// time.
pub(crate) fn shared_engine(fuel: bool) -> wasmtime::Result<Engine> {
    let engines = ENGINES.get_or_init(|| {
        start_ticker();
        Mutex::new(HashMap::new())
    });
    let mut engines = engines.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(engine) = engines.get(&fuel) {
        return Ok(engine.clone());
    }
    let mut config = Config::new();
    config.wasm_component_model(true);
    config.consume_fuel(fuel);
    config.epoch_interruption(true);
    config.cranelift_opt_level(wasmtime::OptLevel::Speed);
    let engine = Engine::new(&config)?;
    engines.insert(fuel, engine.clone());
    Ok(engine)
}

/// The epoch deadline (in ticks from now) that traps a call no earlier than `deadline`: one
/// tick more than the deadline covers, since the current tick is already partly over.
pub(crate) fn deadline_ticks(deadline: Duration) -> u64 {
    let tick = EPOCH_TICK.as_nanos().max(1);
    u64::try_from(deadline.as_nanos().div_ceil(tick))
        .unwrap_or(u64::MAX - 1)
        .saturating_add(1)
}

fn start_ticker() {
    let spawned = std::thread::Builder::new()
        .name("stepscope-policy-epoch".into())
        .spawn(|| {
            loop {
                std::thread::sleep(EPOCH_TICK);
                let Some(engines) = ENGINES.get() else {
                    continue;
                };
                let engines: Vec<Engine> = engines
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .values()
                    .cloned()
                    .collect();
                for engine in engines {
                    engine.increment_epoch();
                }
            }
        });
    if let Err(error) = spawned {
        // Without the ticker no deadline ever passes; fuel (when on) still bounds calls.
        tracing::error!(%error, "cannot start the policy epoch ticker: wall-clock deadlines are off");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_round_up_and_add_the_current_tick() {
        assert_eq!(deadline_ticks(Duration::ZERO), 1);
        assert_eq!(deadline_ticks(Duration::from_micros(1)), 2);
        assert_eq!(deadline_ticks(Duration::from_millis(10)), 11);
        assert_eq!(deadline_ticks(Duration::MAX), u64::MAX);
    }

    #[test]
    fn engines_are_shared_per_fuel_setting() {
        let a = shared_engine(true).unwrap();
        let b = shared_engine(true).unwrap();
        let c = shared_engine(false).unwrap();
        assert!(Engine::same(&a, &b));
        assert!(!Engine::same(&a, &c));
    }
}
