//! The workers of a streaming job: each owns the state of the key groups
//! `g` with `g % workers == index`, for every view, on its own thread.
//! The job's ingest stage sends each worker the staged, on-time rows of
//! its groups, the watermarks, and the checkpoint barriers; at a barrier a
//! worker hands back everything its views changed since the last one, and
//! the job commits the epoch for all of them at once.
//!
//! ```text
//!  ingest ─rows of groups g%N==0─▶ worker 0 ─┐
//!         ─rows of groups g%N==1─▶ worker 1 ─┼─▶ epoch parts ─▶ one commit
//!         ─barrier(epoch)────────▶ every one ┘
//! ```
//!
//! A worker's state is restored by group, so the number of workers may
//! change between restarts of a state dir.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender, sync_channel};
use std::thread::JoinHandle;

use arrow::array::RecordBatch;
use sluice_sql::PipelinePlan;

use crate::error::{EngineError, Result};
use crate::exec::Rows;
use crate::keys::KEY_GROUPS;
use crate::output::OnlineRow;
use crate::store::{StateOp, Store, TileWrites};
use crate::tiles::{TileMemory, pending_key};
use crate::vector::VectorUpdate;
use crate::view::ViewOp;
use crate::watermark::NO_WATERMARK;

/// What a worker is asked to do, in the order the job sends it.
pub(crate) enum ToWorker {
    /// Fold these staged, on-time rows of `view` in.
    Rows { view: usize, rows: Box<Rows> },
    /// The watermark of the source of `views` moved to `wm`.
    Advance { views: Vec<usize>, wm: i64 },
    /// Hand back the epoch's changes.
    Barrier(Vec<ViewMark>),
    /// The epoch committed: cached tiles are clean.
    Committed,
}

/// What a barrier tells a view.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ViewMark {
    /// The source's watermark ([`NO_WATERMARK`]: none yet).
    pub wm: i64,
    /// The largest event time the source gave (lifetime rows' time).
    pub end: Option<i64>,
}

/// One view's changes since the last barrier, in one worker.
#[derive(Default)]
pub(crate) struct ViewPart {
    pub lake: Vec<RecordBatch>,
    pub online: Vec<OnlineRow>,
    pub vectors: Vec<VectorUpdate>,
    pub state: Vec<StateOp>,
    pub tiles: Option<TileWrites>,
    /// `(meta key, value)` of the view's pending rows by group.
    pub pending: Vec<(String, Vec<u8>)>,
    pub emitted_through: Option<i64>,
    pub emitted_rows: u64,
    pub expect: Vec<(String, u64)>,
    /// (open panes, keys) of the pane operator.
    pub sizes: Option<(usize, usize)>,
}

/// A worker's changes since the last barrier, by view.
pub(crate) type Part = Vec<ViewPart>;

/// A worker's answer.
enum Reply {
    Part(usize, Box<Part>),
    Failed(EngineError),
}

/// The job's handles on its workers.
pub(crate) struct Workers {
    senders: Vec<SyncSender<ToWorker>>,
    replies: Receiver<Reply>,
    handles: Vec<JoinHandle<()>>,
    /// Bytes of rows waiting for the watermark, per worker and view.
    pending_bytes: Arc<Vec<AtomicU64>>,
    views: usize,
}

/// Messages a worker's queue holds before the job waits for it.
const QUEUE: usize = 16;

impl Workers {
    /// Starts `n` workers over `plan`'s views, each restoring the state of
    /// its key groups from `store`. `prepare` is applied to every view
    /// operator before it is restored (vector updates kept, …).
    pub(crate) fn start(
        plan: &PipelinePlan,
        n: usize,
        store: &Arc<Store>,
        memory: TileMemory,
        emitted_through: &[Option<i64>],
        prepare: &dyn Fn(&mut ViewOp),
    ) -> Result<Workers> {
        let n = n.clamp(1, usize::from(KEY_GROUPS));
        let views = plan.views.len();
        let (reply_tx, replies) = std::sync::mpsc::channel();
        let pending_bytes: Arc<Vec<AtomicU64>> =
            Arc::new((0..n * views).map(|_| AtomicU64::new(0)).collect());
        let mut senders = Vec::with_capacity(n);
        let mut handles = Vec::with_capacity(n);
        let memory = TileMemory {
            cache: memory.cache / n,
            flush: memory.flush / n,
            pending: memory.pending / n,
        };
        for index in 0..n {
            let mut ops = Vec::with_capacity(views);
            for (vi, vp) in plan.views.iter().enumerate() {
                let mut op = ViewOp::with_tiles(vp, Some(memory))?;
                prepare(&mut op);
                restore(
                    &mut op,
                    store,
                    index,
                    n,
                    emitted_through.get(vi).copied().flatten(),
                )?;
                ops.push(op);
            }
            let (tx, rx) = sync_channel::<ToWorker>(QUEUE);
            let worker = Worker {
                index,
                ops,
                store: Arc::clone(store),
                replies: reply_tx.clone(),
                pending_bytes: Arc::clone(&pending_bytes),
            };
            let h = std::thread::Builder::new()
                .name(format!("sluice-worker-{index}"))
                .spawn(move || worker.run(rx))
                .map_err(|e| EngineError::Internal(format!("starting a worker: {e}")))?;
            senders.push(tx);
            handles.push(h);
        }
        Ok(Workers {
            senders,
            replies,
            handles,
            pending_bytes,
            views,
        })
    }

    /// Number of workers.
    pub(crate) fn len(&self) -> usize {
        self.senders.len()
    }

    /// The worker that owns key group `g`.
    pub(crate) fn owner(&self, g: u16) -> usize {
        usize::from(g) % self.senders.len()
    }

    fn send(&self, w: usize, m: ToWorker) -> Result<()> {
        if self.senders[w].send(m).is_ok() {
            return Ok(());
        }
        // The worker stopped: its own error says why.
        Err(self
            .failure()
            .unwrap_or_else(|| EngineError::Internal(format!("worker {w} stopped"))))
    }

    /// The first error a worker reported, if one did.
    fn failure(&self) -> Option<EngineError> {
        while let Ok(r) = self.replies.try_recv() {
            if let Reply::Failed(e) = r {
                return Some(e);
            }
        }
        None
    }

    /// Sends worker `w` rows of `view`.
    pub(crate) fn rows(&self, w: usize, view: usize, rows: Rows) -> Result<()> {
        self.send(
            w,
            ToWorker::Rows {
                view,
                rows: Box::new(rows),
            },
        )
    }

    /// Tells every worker that the watermark of `views`' source moved.
    pub(crate) fn advance(&self, views: &[usize], wm: i64) -> Result<()> {
        for w in 0..self.senders.len() {
            self.send(
                w,
                ToWorker::Advance {
                    views: views.to_vec(),
                    wm,
                },
            )?;
        }
        Ok(())
    }

    /// A barrier to every worker; their parts, in worker order.
    pub(crate) fn barrier(&self, marks: &[ViewMark]) -> Result<Vec<Part>> {
        for w in 0..self.senders.len() {
            self.send(w, ToWorker::Barrier(marks.to_vec()))?;
        }
        let mut parts: Vec<Option<Part>> = (0..self.senders.len()).map(|_| None).collect();
        for _ in 0..self.senders.len() {
            match self.replies.recv() {
                Ok(Reply::Part(w, p)) => parts[w] = Some(*p),
                Ok(Reply::Failed(e)) => return Err(e),
                Err(_) => return Err(EngineError::Internal("every worker stopped".into())),
            }
        }
        parts
            .into_iter()
            .enumerate()
            .map(|(w, p)| p.ok_or_else(|| EngineError::Internal(format!("no part of worker {w}"))))
            .collect()
    }

    /// Tells every worker the epoch committed.
    pub(crate) fn committed(&self) -> Result<()> {
        for w in 0..self.senders.len() {
            self.send(w, ToWorker::Committed)?;
        }
        Ok(())
    }

    /// Bytes of rows waiting for the watermark in view `view`, over the workers.
    pub(crate) fn pending_bytes(&self, view: usize) -> u64 {
        (0..self.senders.len())
            .map(|w| self.pending_bytes[w * self.views + view].load(Ordering::Relaxed))
            .sum()
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        // Closing the queues ends the workers.
        self.senders.clear();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// Restores worker `index` of `n`'s share of a view's state: the pending
/// rows of its key groups, the pane state of its keys, the fired-through mark.
fn restore(
    op: &mut ViewOp,
    store: &Store,
    index: usize,
    n: usize,
    emitted_through: Option<i64>,
) -> Result<()> {
    let name = op.name().to_string();
    if let Some(t) = op.tiles_mut() {
        t.share(index, n);
        t.restore_clock(crate::checkpoint::read_clock(
            store,
            &crate::checkpoint::clock_key(&name),
        )?);
        for g in (0..KEY_GROUPS).filter(|g| usize::from(*g) % n == index) {
            if let Some(p) = store.meta(&pending_key(&name, g))? {
                t.restore_pending(g, &p)?;
            }
        }
    }
    if let Some(agg) = op.agg_mut() {
        agg.restore_emitted(emitted_through);
        let mut by_pane: std::collections::BTreeMap<i64, Vec<crate::store::StateEntry>> =
            std::collections::BTreeMap::new();
        for (p, e) in store.state_entries(&name)? {
            by_pane.entry(p).or_default().push(e);
        }
        for (p, entries) in by_pane {
            let mine = if n == 1 {
                entries
            } else {
                agg.owned_entries(entries, |g| usize::from(g) % n == index)?
            };
            agg.restore_pane(p, &mine)?;
        }
    }
    Ok(())
}

struct Worker {
    index: usize,
    ops: Vec<ViewOp>,
    store: Arc<Store>,
    replies: Sender<Reply>,
    pending_bytes: Arc<Vec<AtomicU64>>,
}

impl Worker {
    fn run(mut self, rx: Receiver<ToWorker>) {
        for m in rx {
            if let Err(e) = self.handle(m) {
                let _ = self.replies.send(Reply::Failed(e));
                return;
            }
        }
    }

    fn handle(&mut self, m: ToWorker) -> Result<()> {
        match m {
            ToWorker::Rows { view, rows } => {
                let slot = self.index * self.ops.len() + view;
                let op = &mut self.ops[view];
                op.push(*rows)?;
                if let Some(t) = op.tiles() {
                    self.pending_bytes[slot].store(t.pending_bytes() as u64, Ordering::Relaxed);
                }
            }
            ToWorker::Advance { views, wm } => {
                for v in views {
                    self.ops[v].advance(wm)?;
                }
            }
            ToWorker::Barrier(marks) => {
                let part = self.barrier(&marks)?;
                let _ = self.replies.send(Reply::Part(self.index, Box::new(part)));
            }
            ToWorker::Committed => {
                for op in self.ops.iter_mut() {
                    if let Some(t) = op.tiles_mut() {
                        t.committed();
                    }
                }
            }
        }
        Ok(())
    }

    fn barrier(&mut self, marks: &[ViewMark]) -> Result<Part> {
        let views = self.ops.len();
        let mut part = Vec::with_capacity(views);
        for (vi, (op, mark)) in self.ops.iter_mut().zip(marks).enumerate() {
            op.before_checkpoint(mark.end)?;
            let mut p = ViewPart {
                lake: std::mem::take(&mut op.pending_lake),
                online: std::mem::take(&mut op.pending_online),
                vectors: std::mem::take(&mut op.pending_vectors),
                ..ViewPart::default()
            };
            let name = op.name().to_string();
            if let Some(t) = op.tiles_mut() {
                if mark.wm != NO_WATERMARK {
                    let mut w = TileWrites::default();
                    t.flush(self.store.as_ref(), mark.wm, &mut w)?;
                    p.tiles = Some(w);
                }
                p.pending = t
                    .encode_pending()?
                    .into_iter()
                    .map(|(g, v)| (pending_key(&name, g), v))
                    .collect();
                self.pending_bytes[self.index * views + vi]
                    .store(t.pending_bytes() as u64, Ordering::Relaxed);
            }
            op.checkpoint(&mut p.state)?;
            p.emitted_through = op.agg().and_then(|a| a.emitted_through());
            p.sizes = op.agg().map(|a| a.sizes());
            p.emitted_rows = op.emitted_rows;
            p.expect = op.expectations.failures();
            part.push(p);
        }
        Ok(part)
    }
}
