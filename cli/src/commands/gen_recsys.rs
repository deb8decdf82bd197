//! `sluice gen-recsys`: item embeddings and user clicks for the recsys
//! example and the vector tests. Items fall into categories (an embedding
//! is its category's centroid plus noise); each user clicks mostly items of
//! one favourite category, so a user's mean embedding lands near that
//! category's items.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::json;

use crate::commands::generate::{BASE_TS, Rng, rfc3339};

/// Options of `sluice gen-recsys`.
#[derive(clap::Args, Debug, Clone)]
pub struct RecsysArgs {
    /// Output folder (items.jsonl, clicks.jsonl, users.jsonl).
    #[arg(long, default_value = ".")]
    pub dir: PathBuf,
    /// Number of items.
    #[arg(long, default_value_t = 2000)]
    pub items: u64,
    /// Number of users.
    #[arg(long, default_value_t = 300)]
    pub users: u64,
    /// Number of clicks.
    #[arg(long, default_value_t = 30_000)]
    pub clicks: u64,
    /// Embedding dimension.
    #[arg(long, default_value_t = 32)]
    pub dims: usize,
    /// Number of item categories.
    #[arg(long, default_value_t = 8)]
    pub categories: u64,
    /// Click time span in minutes from 2024-01-01T00:00:00Z.
    #[arg(long, default_value_t = 180)]
    pub minutes: u64,
    /// Every N-th click has a malformed embedding (0: none), to show dead letters.
    #[arg(long, default_value_t = 0)]
    pub bad_every: u64,
    /// Random seed.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
}

fn unit(rng: &mut Rng) -> f32 {
    (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
}

fn round(v: f32) -> f64 {
    (f64::from(v) * 1e4).round() / 1e4
}

/// The favourite category of user `u`.
pub fn favourite(u: u64, categories: u64) -> u64 {
    (u * 7 + 3) % categories.max(1)
}

fn open(dir: &Path, name: &str) -> anyhow::Result<BufWriter<std::fs::File>> {
    let p = dir.join(name);
    Ok(BufWriter::new(std::fs::File::create(&p).with_context(
        || format!("cannot create {}", p.display()),
    )?))
}

/// Writes the example's files.
pub fn run(a: &RecsysArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&a.dir)
        .with_context(|| format!("cannot create {}", a.dir.display()))?;
    let mut rng = Rng::new(a.seed);
    let cats = a.categories.max(1);
    let centroids: Vec<Vec<f32>> = (0..cats)
        .map(|_| (0..a.dims).map(|_| unit(&mut rng)).collect())
        .collect();
    let mut embeddings = Vec::with_capacity(a.items as usize);
    let mut items = open(&a.dir, "items.jsonl")?;
    for i in 0..a.items {
        let c = i % cats;
        let e: Vec<f64> = centroids[c as usize]
            .iter()
            .map(|x| round(x + 0.35 * unit(&mut rng)))
            .collect();
        let rec = json!({
            "item_id": format!("item{i}"),
            "category": format!("cat{c}"),
            "embedding": e,
            "updated_at": rfc3339(BASE_TS + (i % 60) as i64 * 1000),
        });
        writeln!(items, "{rec}")?;
        embeddings.push(e);
    }
    items.flush()?;
    let mut users = open(&a.dir, "users.jsonl")?;
    for u in 0..a.users {
        writeln!(
            users,
            "{}",
            json!({"user_id": format!("user{u}"), "favourite": format!("cat{}", favourite(u, cats))})
        )?;
    }
    users.flush()?;
    let mut clicks = open(&a.dir, "clicks.jsonl")?;
    let span = a.minutes.max(1) * 60_000;
    let per_cat = a.items.div_ceil(cats).max(1);
    for n in 0..a.clicks {
        let u = rng.below(a.users.max(1));
        // 80 % of a user's clicks are in the favourite category.
        let c = if rng.below(10) < 8 {
            favourite(u, cats)
        } else {
            rng.below(cats)
        };
        let i = (rng.below(per_cat) * cats + c).min(a.items.saturating_sub(1));
        let ts = BASE_TS + (n * span / a.clicks.max(1)) as i64;
        let line = if a.bad_every > 0 && n % a.bad_every == a.bad_every - 1 {
            // One element short: dead-lettered, never a crash.
            let short = &embeddings[i as usize][1..];
            json!({"user_id": format!("user{u}"), "item_id": format!("item{i}"), "item_embedding": short, "ts": rfc3339(ts)})
        } else {
            json!({"user_id": format!("user{u}"), "item_id": format!("item{i}"), "item_embedding": embeddings[i as usize], "ts": rfc3339(ts)})
        };
        writeln!(clicks, "{line}")?;
    }
    clicks.flush()?;
    eprintln!(
        "wrote {} items, {} users, {} clicks ({}-d) to {}",
        a.items,
        a.users,
        a.clicks,
        a.dims,
        a.dir.display()
    );
    Ok(())
}
