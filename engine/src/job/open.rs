//! Opening a job: the state dir, the last checkpoint, each view's stateless
//! half and reader, the workers restoring their key groups, the sources
//! sought to their committed positions with their clocks, and `Live`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_sql::PipelinePlan;

use super::sources::SourceRt;
use super::{Job, JobOptions, RunStats, ViewRt, split_budget};
use crate::checkpoint::{Checkpoint, catch_up_key};
use crate::error::{EngineError, Result};
use crate::ingest::Ingest;
use crate::live::{Freshness, Live, view_change};
use crate::online::read_view_meta;
use crate::source::{DeadLetterSink, OfflineSink, Source};
use crate::store::Store;
use crate::tiles::{TileReader, is_tiled};
use crate::vector::VectorIndex;
use crate::view::ViewOp;
use crate::watermark::{NO_WATERMARK, WatermarkTracker};
use crate::worker::Workers;

impl Job {
    /// Opens the state dir, recovers the last checkpoint and prepares to run.
    /// `sources` are in the plan's source order; `lakes` map view name to its offline sink.
    pub fn open(
        plan: &PipelinePlan,
        sources: Vec<Box<dyn Source>>,
        mut lakes: HashMap<String, Vec<Box<dyn OfflineSink>>>,
        mut dead: Box<dyn DeadLetterSink>,
        opts: JobOptions,
    ) -> Result<Job> {
        let view_names: Vec<String> = plan.views.iter().map(|v| v.name.clone()).collect();
        let tiled = plan.views.iter().filter(|v| is_tiled(v)).count();
        let (store_limits, tile_memory) = split_budget(opts.memory_budget, tiled);
        let store = Arc::new(Store::open_with(
            &opts.state_dir,
            &view_names,
            store_limits,
        )?);
        let cp = Checkpoint::load(&store, &opts.state_dir)?.unwrap_or_default();
        let epoch = cp.epoch;
        let state_id = crate::checkpoint::state_id(&store, &opts.state_dir)?;
        let mut views = Vec::new();
        let mut stages: Vec<Vec<crate::ingest::ViewStage>> =
            plan.sources.iter().map(|_| Vec::new()).collect();
        let mut metas = HashMap::new();
        let mut catch_up = HashMap::new();
        let mut indexes = HashMap::new();
        let mut readers = HashMap::new();
        for vp in &plan.views {
            // The view's stateless half and reader; its state is the workers'.
            let probe = ViewOp::with_tiles(vp, None)?;
            let source = plan
                .sources
                .iter()
                .position(|s| s.name == vp.source)
                .ok_or_else(|| {
                    EngineError::Internal(format!("view `{}` reads no known source", vp.name))
                })?;
            stages[source].push(probe.stage()?);
            if let (Some(k), true) = (probe.kernel(), is_tiled(vp)) {
                readers.insert(
                    vp.name.clone(),
                    Arc::new(TileReader::new(vp, Arc::clone(k))?),
                );
            }
            if let Some(vi) = &vp.vector_index {
                let idx = VectorIndex::open(&opts.state_dir, &vp.name, vi)?;
                if idx.epoch()? != Some(epoch) {
                    let wm = cp.sources.get(&vp.source).and_then(|s| s.watermark);
                    let st = crate::vector::rebuild_from_store(&idx, &store, epoch, wm)?;
                    tracing::info!(view = %vp.name, keys = st.upserts, "vector index rebuilt from the online store");
                }
                indexes.insert(vp.name.clone(), Arc::new(idx));
            }
            let meta = probe.meta()?;
            // A view added to a state dir earlier keeps its catch-up point.
            if let Some(at) = store.meta_i64(&catch_up_key(&vp.name))? {
                catch_up.insert(vp.name.clone(), at);
            }
            // A view new to an existing state dir starts at the source's
            // watermark: it has caught up once that moved a window past it.
            if epoch > 0 && read_view_meta(&store, &vp.name)?.is_none() {
                let start = cp.sources.get(&vp.source).and_then(|s| s.watermark);
                let size = match vp.window() {
                    Some(sluice_sql::WindowSpec::Hop { size_ms, .. }) => Some(size_ms),
                    Some(sluice_sql::WindowSpec::Tumble { size_ms }) => Some(size_ms),
                    _ => None,
                };
                if let Some(start) = start {
                    catch_up.insert(
                        vp.name.clone(),
                        size.map_or(i64::MAX, |s| start.saturating_add(s)),
                    );
                }
            }
            if epoch > 0
                && let Some(old) = read_view_meta(&store, &vp.name)?
                && (old.query != meta.query || old.window != meta.window || old.keys != meta.keys)
            {
                return Err(EngineError::Incompatible {
                    path: opts.state_dir.display().to_string(),
                    reason: format!(
                        "feature view `{}` changed since this state was written: {}; run it with a new --state-dir (or backfill), or give the changed view a new name",
                        vp.name,
                        view_change(&old, &meta)
                    ),
                });
            }
            metas.insert(vp.name.clone(), meta.clone());
            views.push(ViewRt {
                name: vp.name.clone(),
                source,
                meta,
            });
        }
        let emitted: Vec<Option<i64>> = plan
            .views
            .iter()
            .map(|v| cp.views.get(&v.name).and_then(|p| p.emitted_through))
            .collect();
        let workers = Workers::start(
            plan,
            opts.workers,
            &store,
            tile_memory,
            &emitted,
            &|op: &mut ViewOp| {
                if op.plan.vector_index.is_some() {
                    op.keep_vector_updates();
                }
            },
        )?;
        let mut lake_vec = Vec::new();
        for vp in &plan.views {
            let mut sinks = lakes.remove(&vp.name).unwrap_or_default();
            for l in sinks.iter_mut() {
                l.recover(&state_id, epoch)?;
            }
            lake_vec.push(sinks);
        }
        dead.recover(cp.dead_letter_len)?;
        let dead = crate::source::CappedDeadLetters::new(
            dead,
            opts.dead_letter_limit,
            cp.dead_letter_bytes.clone(),
        );
        let mut rts = Vec::new();
        let now = Instant::now();
        for ((sp, mut src), stages) in plan.sources.iter().zip(sources).zip(stages) {
            let progress = cp.sources.get(&sp.name).cloned().unwrap_or_default();
            src.seek((!progress.position.is_empty()).then_some(progress.position.as_slice()))?;
            let mut clock = WatermarkTracker::new(
                sp.watermark_delay_ms,
                sp.idle_timeout_ms
                    .map(|ms| Duration::from_millis(ms.max(0) as u64)),
            );
            clock.restore(
                progress.watermark,
                progress.max_event_time,
                &progress.partitions,
                now,
            );
            let advanced = clock.watermark();
            let mut rt = SourceRt {
                src,
                name: sp.name.clone(),
                ingest: Ingest::new(sp, stages, clock)?,
                done: false,
                views: plan
                    .views
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| v.source == sp.name)
                    .map(|(i, _)| i)
                    .collect(),
                advanced,
                last_parts_refresh: now,
                down: None,
                last_good: Vec::new(),
                retry: None,
                archive: None,
            };
            rt.last_good = rt.src.position();
            rt.add_partitions(now);
            rts.push(rt);
        }
        let watermarks = plan
            .views
            .iter()
            .map(|v| {
                let wm = rts
                    .iter()
                    .find(|s| s.name == v.source)
                    .map(|s| s.clock().watermark())
                    .unwrap_or(NO_WATERMARK);
                (v.name.clone(), AtomicI64::new(wm))
            })
            .collect();
        let live = Arc::new(Live {
            store,
            watermarks,
            views: metas,
            ready: AtomicBool::new(false),
            unready: Mutex::new(BTreeMap::new()),
            indexes,
            readers,
            freshness: Freshness {
                slo_ms: plan
                    .views
                    .iter()
                    .filter_map(|v| v.freshness_slo_ms.map(|ms| (v.name.clone(), ms)))
                    .collect(),
                newest: plan
                    .views
                    .iter()
                    .map(|v| {
                        let t = rts
                            .iter()
                            .find(|s| s.name == v.source)
                            .and_then(|s| s.clock().max_event_time())
                            .unwrap_or(NO_WATERMARK);
                        (v.name.clone(), AtomicI64::new(t))
                    })
                    .collect(),
                last_checkpoint_ms: AtomicI64::new(0),
            },
            catch_up,
            versions: crate::reader::versions_of(plan),
            served: plan
                .views
                .iter()
                .filter_map(|v| {
                    v.log_served
                        .map(|f| (v.name.clone(), Arc::new(crate::served::ServedLog::new(f))))
                })
                .collect(),
        });
        let n = plan.views.len();
        Ok(Job {
            sources: rts,
            views,
            workers,
            lakes: lake_vec,
            dead,
            epoch,
            live,
            opts,
            last_checkpoint: Instant::now(),
            stats: RunStats::default(),
            pipeline_text: plan.text.clone(),
            tile_memory,
            state_id,
            letters: Vec::new(),
            expectations: vec![Vec::new(); n],
            sizes: vec![None; n],
        })
    }
}
