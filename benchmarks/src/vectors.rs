//! `sluice-bench vectors`: the vector index's update throughput, query
//! latency and recall against an exact brute-force scan of the same
//! vectors, in one run (run by hand with --release; see README).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use sluice_engine::vector::{Query, VectorIndex, VectorUpdate};
use sluice_sql::vector::{Distance, VectorIndexPlan};

use sluice_cli::commands::generate::Rng;

/// Options of `sluice-bench vectors`.
#[derive(clap::Args, Debug)]
pub struct BenchVectorsArgs {
    /// Working directory (indexes are written under it).
    #[arg(long, default_value = "sluice-bench-vectors")]
    dir: PathBuf,
    /// Index sizes for the query figures.
    #[arg(long, value_delimiter = ',', default_values_t = vec![100_000usize, 1_000_000])]
    sizes: Vec<usize>,
    /// Dimensions for the update figures (the query figures use the first).
    #[arg(long, value_delimiter = ',', default_values_t = vec![64usize, 384])]
    dims: Vec<usize>,
    /// Vectors per update run (and per checkpoint batch: `--batch`).
    #[arg(long, default_value_t = 100_000)]
    updates: usize,
    /// Vectors applied per checkpoint in the update runs.
    #[arg(long, default_value_t = 10_000)]
    batch: usize,
    /// Queries per size.
    #[arg(long, default_value_t = 500)]
    queries: usize,
    /// Neighbours per query.
    #[arg(short, long, default_value_t = 10)]
    k: usize,
    /// Extra `search_k` settings to sweep on the first size (recall vs latency).
    #[arg(long, value_delimiter = ',')]
    sweep: Vec<usize>,
    /// Skip the update-throughput runs.
    #[arg(long)]
    no_updates: bool,
}

fn unit(rng: &mut Rng) -> f32 {
    (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
}

fn vector(rng: &mut Rng, dims: usize) -> Vec<f32> {
    (0..dims).map(|_| unit(rng)).collect()
}

fn plan(dims: usize) -> VectorIndexPlan {
    VectorIndexPlan {
        column: "v".into(),
        dims,
        distance: Distance::Cosine,
        trees: None,
        search_k: None,
    }
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Fills a fresh index with `n` vectors in checkpoints of `batch`; returns seconds.
fn fill(
    idx: &VectorIndex,
    rng: &mut Rng,
    n: usize,
    dims: usize,
    batch: usize,
    epoch: &mut u64,
) -> anyhow::Result<f64> {
    let t0 = Instant::now();
    let mut done = 0;
    while done < n {
        let m = batch.min(n - done);
        let ups: Vec<VectorUpdate> = (done..done + m)
            .map(|i| VectorUpdate {
                key: format!("k{i}"),
                vector: Some(vector(rng, dims)),
                valid_until: None,
            })
            .collect();
        *epoch += 1;
        idx.apply(*epoch, &ups, None, false)?;
        done += m;
    }
    Ok(t0.elapsed().as_secs_f64())
}

/// Runs the benchmark.
pub fn run(a: &BenchVectorsArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&a.dir)
        .with_context(|| format!("cannot create {}", a.dir.display()))?;
    let mut rng = Rng::new(11);
    println!("# vector index benchmark (arroy 0.9, cosine, k={})", a.k);
    println!(
        "\n## update throughput ({} vectors per checkpoint)",
        a.batch
    );
    println!(
        "| dims | fresh index: {} inserts | then {} updates of existing keys |",
        a.updates,
        a.updates / 2
    );
    println!("|---|---|---|");
    for &dims in a.dims.iter().filter(|_| !a.no_updates) {
        let d = a.dir.join(format!("upd-{dims}"));
        let _ = std::fs::remove_dir_all(&d);
        let idx = VectorIndex::open(&d, "v", &plan(dims))?;
        let mut epoch = 0;
        let secs = fill(&idx, &mut rng, a.updates, dims, a.batch, &mut epoch)?;
        // Updates: existing keys get new vectors.
        let t0 = Instant::now();
        let n_upd = a.updates / 2;
        let mut done = 0;
        while done < n_upd {
            let m = a.batch.min(n_upd - done);
            let ups: Vec<VectorUpdate> = (0..m)
                .map(|_| VectorUpdate {
                    key: format!("k{}", rng.below(a.updates as u64)),
                    vector: Some(vector(&mut rng, dims)),
                    valid_until: None,
                })
                .collect();
            epoch += 1;
            idx.apply(epoch, &ups, None, false)?;
            done += m;
        }
        let upd = t0.elapsed().as_secs_f64();
        println!(
            "| {dims} | {:.2} s = {:.0} vectors/s | {:.2} s = {:.0} vectors/s |",
            secs,
            a.updates as f64 / secs,
            upd,
            n_upd as f64 / upd
        );
        drop(idx);
        let _ = std::fs::remove_dir_all(&d);
    }
    let dims = a.dims.first().copied().unwrap_or(64);
    println!(
        "\n## queries, {dims}-d, k={}: arroy trees vs exact brute-force scan of the same index",
        a.k
    );
    println!(
        "| vectors | build | arroy p50 | arroy p99 | exact p50 | exact p99 | recall@{} | index size |",
        a.k
    );
    println!("|---|---|---|---|---|---|---|---|");
    for &n in &a.sizes {
        let d = a.dir.join(format!("q-{n}"));
        let _ = std::fs::remove_dir_all(&d);
        let idx = VectorIndex::open(&d, "v", &plan(dims))?;
        let mut epoch = 0;
        let build = fill(&idx, &mut rng, n, dims, n.min(100_000), &mut epoch)?;
        let mut tree = Vec::with_capacity(a.queries);
        let mut exact = Vec::with_capacity(a.queries);
        let mut hits = 0usize;
        for _ in 0..a.queries {
            let q = vector(&mut rng, dims);
            let t = Instant::now();
            let got = idx
                .nearest(Query::Vector(&q), a.k, None)?
                .unwrap_or_default();
            tree.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            let want = idx
                .nearest_exact(Query::Vector(&q), a.k)?
                .unwrap_or_default();
            exact.push(t.elapsed().as_secs_f64() * 1e3);
            hits += got
                .iter()
                .filter(|g| want.iter().any(|w| w.key == g.key))
                .count();
        }
        tree.sort_by(f64::total_cmp);
        exact.sort_by(f64::total_cmp);
        for &sk in a.sweep.iter().filter(|_| n == a.sizes[0]) {
            let mut lat = Vec::new();
            let mut h = 0;
            let mut r2 = Rng::new(99);
            for _ in 0..a.queries.min(200) {
                let q = vector(&mut r2, dims);
                let t = Instant::now();
                let got = idx
                    .nearest(Query::Vector(&q), a.k, Some(sk))?
                    .unwrap_or_default();
                lat.push(t.elapsed().as_secs_f64() * 1e3);
                let want = idx
                    .nearest_exact(Query::Vector(&q), a.k)?
                    .unwrap_or_default();
                h += got
                    .iter()
                    .filter(|g| want.iter().any(|w| w.key == g.key))
                    .count();
            }
            lat.sort_by(f64::total_cmp);
            println!(
                "sweep search_k={sk}: recall@{} {:.3}, p50 {:.2} ms, p99 {:.2} ms",
                a.k,
                h as f64 / (lat.len() * a.k) as f64,
                pct(&lat, 0.5),
                pct(&lat, 0.99)
            );
        }
        let size = sluice_engine::store::dir_size(&d) as f64 / (1 << 20) as f64;
        println!(
            "| {n} | {build:.1} s | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.3} | {size:.0} MiB |",
            pct(&tree, 0.5),
            pct(&tree, 0.99),
            pct(&exact, 0.5),
            pct(&exact, 0.99),
            hits as f64 / (a.queries * a.k) as f64
        );
        drop(idx);
        let _ = std::fs::remove_dir_all(&d);
    }
    println!("\npeak RSS {} MiB", crate::peak_rss_mib());
    Ok(())
}
