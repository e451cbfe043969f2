//! Running a tract plan: the run state kept between runs, large plans on tract's thread pool,
//! and the choice of tract runtime. Shared by the vision encoder and the pose head.

use tract_onnx::prelude::*;

/// Multiply-adds per run from which a plan runs on tract's pool (see [`on_tract_pool`]):
/// about a millisecond of work. Moving a run onto the pool costs tens of microseconds, more
/// than a small pose head or the tiny test tower saves by it.
const POOL_MIN_FMA: u64 = 100_000_000;

/// Run `f` on a thread of tract's matrix-product pool when tract has one (else here).
///
/// Every parallel operator hands its work to that pool. Called from outside the pool, each
/// hand-off queues the work, wakes a pool thread and puts this thread to sleep until it is done
/// (about 160 hand-offs per ViT-B/16 run). Called from a pool thread, an operator runs its share
/// at once on that thread and wakes only the other workers.
fn on_tract_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    match tract_linalg::multithread::current_tract_executor() {
        tract_linalg::multithread::Executor::MultiThread(pool) => pool.install(f),
        _ => f(),
    }
}

/// Multiply-adds of one run of `model`, as its operators state them (0 where one cannot say).
pub(crate) fn fma_per_run(model: &TypedModel) -> u64 {
    model
        .nodes()
        .iter()
        .filter_map(|node| {
            let inputs = model.node_input_facts(node.id).ok()?;
            node.op.cost(&inputs).ok()
        })
        .flatten()
        .filter(|(cost, _)| matches!(cost, tract_onnx::tract_core::ops::Cost::FMA(_)))
        .map(|(_, n)| n.to_i64().map_or(0, |n| n.max(0) as u64))
        .sum()
}

/// A tract plan with its run state kept between runs: spawning a fresh state per run (what
/// `plan.run` does) costs more than the whole pose head on a small model. After a failed run
/// the state is rebuilt, so a bad input cannot leave stale values behind. Large plans run on
/// tract's pool ([`on_tract_pool`]).
#[derive(Debug)]
pub(crate) struct TractRunner {
    plan: std::sync::Arc<TypedRunnableModel>,
    state: KeptState<TypedSimpleState>,
    on_pool: bool,
}

/// A plan's run state kept from one run to the next (spawned on first use); a failed run drops
/// it, so the next run starts from a fresh one.
#[derive(Debug)]
pub(crate) struct KeptState<S>(std::sync::Mutex<Option<S>>);

impl<S> KeptState<S> {
    pub(crate) fn new() -> Self {
        Self(std::sync::Mutex::new(None))
    }

    pub(crate) fn run<R>(
        &self,
        spawn: impl FnOnce() -> TractResult<S>,
        run: impl FnOnce(&mut S) -> TractResult<R>,
    ) -> TractResult<R> {
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let mut state = match slot.take() {
            Some(state) => state,
            None => spawn()?,
        };
        let out = run(&mut state)?;
        *slot = Some(state);
        Ok(out)
    }
}

impl TractRunner {
    pub(crate) fn new(plan: std::sync::Arc<TypedRunnableModel>) -> Self {
        let on_pool = fma_per_run(plan.model()) >= POOL_MIN_FMA;
        Self {
            plan,
            state: KeptState::new(),
            on_pool,
        }
    }

    pub(crate) fn run(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        self.state.run(
            || self.plan.spawn(),
            |state| self.on_its_thread(|| state.run(inputs)),
        )
    }

    /// Run `f` where this plan's runs happen: on tract's pool for a large plan, else here.
    pub(crate) fn on_its_thread<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        if self.on_pool {
            on_tract_pool(f)
        } else {
            f()
        }
    }

    pub(crate) fn plan(&self) -> &std::sync::Arc<TypedRunnableModel> {
        &self.plan
    }
}

/// The tract runtime name of the encoder's default path: this crate's own CPU plan, with its
/// fused operators and thread handling ([`load_plan`], `TractRunner`).
pub const CPU_RUNTIME: &str = "cpu";

/// The tract runtime called `name` (e.g. `cuda` on a build with the `vision-cuda` feature;
/// `default` is tract's generic CPU runtime), or an error that says which runtimes this build
/// can use here.
pub fn tract_runtime(name: &str) -> Result<&'static dyn Runtime, String> {
    let usable = || {
        // tract calls its generic CPU runtime "cpu" too; here that name is this crate's plan.
        let mut names = vec![CPU_RUNTIME.to_string(), "default".to_string()];
        names.extend(
            runtimes()
                .map(|r| r.name().to_string())
                .filter(|n| n != "cpu"),
        );
        names.join(", ")
    };
    match runtime_for_name(name) {
        Ok(Some(rt)) => Ok(rt),
        Ok(None) => Err(format!(
            "tract runtime {name:?} is not in this build (usable here: {}; \"cuda\" needs a build \
             with --features vision-cuda)",
            usable()
        )),
        Err(e) => Err(format!(
            "tract runtime {name:?} cannot run here: {e:#} (usable here: {})",
            usable()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fma_per_run_counts_a_matrix_product_before_and_after_optimisation() {
        use tract_onnx::tract_core::ops::einsum::EinSum;
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([8, 16])).unwrap();
        let w = model
            .add_const("w", Tensor::from_shape(&[16, 4], &[0.5f32; 64]).unwrap())
            .unwrap();
        let axes = "mk,kn->mn".parse().unwrap();
        let y = model
            .wire_node("mm", EinSum::new(axes, f32::datum_type()), &[x, w])
            .unwrap();
        model.select_output_outlets(&y).unwrap();
        assert_eq!(fma_per_run(&model), 8 * 16 * 4);
        let plan = model.into_optimized().unwrap().into_runnable().unwrap();
        assert_eq!(fma_per_run(plan.model()), 8 * 16 * 4);
        // Far below the pool threshold: such a plan runs on the calling thread.
        assert!(!TractRunner::new(plan).on_pool);
    }
}
