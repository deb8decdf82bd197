//! Nearest-neighbour search against a brute force computed here, in f64,
//! independently of the index: uniform and clustered vectors, with and
//! without filters, batches, and queries racing epoch commits.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use sluice_engine::vector::{Attr, Query, Search, VectorIndex, VectorUpdate};
use sluice_sql::vector::{Distance, FilterColumn, FilterKind, VectorIndexPlan};

/// xorshift64*: deterministic data without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [0, 1).
    fn f(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// Standard normal (Box–Muller).
    fn normal(&mut self) -> f64 {
        let u = self.f().max(1e-300);
        let v = self.f();
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
    fn uniform(&mut self, dims: usize) -> Vec<f32> {
        (0..dims).map(|_| (self.f() * 2.0 - 1.0) as f32).collect()
    }
}

/// `n` vectors from a mixture of `clusters` Gaussians (spread 0.15
/// around centres drawn uniformly from the cube).
fn clustered(rng: &mut Rng, n: usize, dims: usize, clusters: usize) -> Vec<Vec<f32>> {
    let centres: Vec<Vec<f32>> = (0..clusters).map(|_| rng.uniform(dims)).collect();
    (0..n)
        .map(|_| {
            let c = &centres[rng.below(clusters as u64) as usize];
            c.iter()
                .map(|x| (*x as f64 + 0.15 * rng.normal()) as f32)
                .collect()
        })
        .collect()
}

fn filter_columns() -> Vec<FilterColumn> {
    vec![
        FilterColumn {
            name: "category".into(),
            kind: FilterKind::Text,
        },
        FilterColumn {
            name: "tier".into(),
            kind: FilterKind::Integer,
        },
        FilterColumn {
            name: "in_stock".into(),
            kind: FilterKind::Boolean,
        },
    ]
}

fn plan(dims: usize, distance: Distance, filters: bool) -> VectorIndexPlan {
    VectorIndexPlan {
        column: "v".into(),
        dims,
        distance,
        trees: None,
        search_k: None,
        filter_columns: if filters {
            filter_columns()
        } else {
            Vec::new()
        },
    }
}

/// One item: its vector and filter values (category `c0`..`c199` with
/// weights making `c0` 55% of the items, `c1..c10` 5% together, `c11`
/// 0.5%; tier 0..9 or NULL; in_stock).
struct Item {
    key: String,
    v: Vec<f32>,
    category: String,
    tier: Option<i64>,
    in_stock: bool,
}

fn items(rng: &mut Rng, vectors: Vec<Vec<f32>>) -> Vec<Item> {
    vectors
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let r = rng.below(1000);
            let category = match r {
                0..550 => "c0".to_string(),
                550..600 => format!("c{}", 1 + r % 10),
                600..605 => "c11".to_string(),
                _ => format!("c{}", 12 + r % 188),
            };
            let t = rng.below(11);
            Item {
                key: format!("item{i}"),
                v,
                category,
                tier: (t < 10).then_some(t as i64),
                in_stock: rng.below(2) == 0,
            }
        })
        .collect()
}

fn update(it: &Item) -> VectorUpdate {
    VectorUpdate {
        key: it.key.clone(),
        vector: Some(it.v.clone()),
        valid_until: None,
        attrs: vec![
            Attr::Text(it.category.clone()),
            it.tier.map_or(Attr::Null, Attr::Int),
            Attr::Bool(it.in_stock),
        ],
    }
}

/// The distance in Sluice's units, in f64.
fn distance(d: Distance, a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    match d {
        Distance::Cosine => {
            let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
            let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
            1.0 - dot / (na * nb)
        }
        Distance::Euclidean => a
            .iter()
            .zip(b)
            .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
            .sum::<f64>()
            .sqrt(),
        Distance::Dot => -dot,
    }
}

/// The brute-force `k` nearest items passing `keep`, nearest first.
fn brute<'a>(
    d: Distance,
    items: &'a [Item],
    q: &[f32],
    k: usize,
    keep: impl Fn(&Item) -> bool,
) -> Vec<(&'a str, f64)> {
    let mut all: Vec<(&str, f64)> = items
        .iter()
        .filter(|it| keep(it))
        .map(|it| (it.key.as_str(), distance(d, q, &it.v)))
        .collect();
    all.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(b.0)));
    all.truncate(k);
    all
}

/// Recall of `got` against `want`, counted as in ANN benchmarks: a result
/// counts if it is no farther than the k-th true neighbour (ties in f32).
fn hits(got: &[sluice_engine::vector::Neighbour], want: &[(&str, f64)]) -> usize {
    let keys: HashSet<&str> = want.iter().map(|w| w.0).collect();
    got.iter().filter(|g| keys.contains(g.key.as_str())).count()
}

/// Which items a filter keeps, written out in Rust.
type Keep = dyn Fn(&Item) -> bool;

fn filtered_recall(
    idx: &VectorIndex,
    items: &[Item],
    d: Distance,
    queries: &[Vec<f32>],
    filter: Option<(&str, &Keep)>,
    exact: bool,
    search_k: Option<usize>,
) -> (f64, bool) {
    let f = filter.map(|(text, _)| idx.filter(text).expect("filter parses"));
    let mut h = 0;
    let mut total = 0;
    let mut was_exact = true;
    for q in queries {
        let s = Search {
            exact,
            search_k,
            filter: f.as_ref(),
            ..Search::one(Query::Vector(q), 10)
        };
        let found = idx.search(&s).expect("search");
        was_exact &= found.exact;
        let got = found.results[0].clone().expect("a vector query");
        let want = match filter {
            Some((_, keep)) => brute(d, items, q, 10, keep),
            None => brute(d, items, q, 10, |_| true),
        };
        if let Some((_, keep)) = filter {
            let by_key: BTreeMap<&str, &Item> =
                items.iter().map(|it| (it.key.as_str(), it)).collect();
            for g in &got {
                assert!(
                    keep(by_key[g.key.as_str()]),
                    "{} does not pass the filter",
                    g.key
                );
            }
        }
        if exact {
            // The exact scan returns the brute force's keys and distances.
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g.distance as f64 - w.1).abs() < 1e-4 * w.1.abs().max(1.0),
                    "{g:?} vs {w:?}"
                );
            }
        }
        h += hits(&got, &want);
        total += want.len();
    }
    (h as f64 / total.max(1) as f64, was_exact)
}

fn check_dataset(name: &str, d: Distance, vectors: Vec<Vec<f32>>, min_recall: f64) {
    check_dataset_at(name, d, vectors, min_recall, None)
}

fn check_dataset_at(
    name: &str,
    d: Distance,
    vectors: Vec<Vec<f32>>,
    min_recall: f64,
    search_k: Option<usize>,
) {
    let dims = vectors[0].len();
    let mut rng = Rng(0xfeed);
    let items = items(&mut rng, vectors);
    let dir = tempfile::tempdir().expect("tempdir");
    let idx = VectorIndex::open(dir.path(), "items", &plan(dims, d, true)).expect("open");
    let ups: Vec<VectorUpdate> = items.iter().map(update).collect();
    idx.apply(1, &ups, None, false).expect("apply");
    // Queries near the data: perturbed items (the usual "more like this").
    let queries: Vec<Vec<f32>> = (0..60)
        .map(|_| {
            let it = &items[rng.below(items.len() as u64) as usize];
            it.v.iter()
                .map(|x| (*x as f64 + 0.05 * rng.normal()) as f32)
                .collect()
        })
        .collect();
    let (r, _) = filtered_recall(&idx, &items, d, &queries, None, true, search_k);
    assert!(r > 0.999, "{name}: exact scan recall {r}");
    let (r, ex) = filtered_recall(&idx, &items, d, &queries, None, false, search_k);
    eprintln!("{name}: trees recall@10 {r:.3}");
    assert!(!ex);
    assert!(r >= min_recall, "{name}: recall@10 {r:.3} < {min_recall}");
    let half = |it: &Item| it.category == "c0";
    let five = |it: &Item| it.category != "c0" && (1..=10).any(|c| it.category == format!("c{c}"));
    let tiny = |it: &Item| it.category == "c11";
    let cases: [(&str, &Keep, f64); 3] = [
        ("category = 'c0'", &half, min_recall),
        (
            "category IN ('c1','c2','c3','c4','c5','c6','c7','c8','c9','c10')",
            &five,
            0.999,
        ),
        ("category = 'c11'", &tiny, 0.999),
    ];
    for (text, keep, want) in cases {
        let sel = items.iter().filter(|it| keep(it)).count() as f64 / items.len() as f64;
        let (r, ex) = filtered_recall(
            &idx,
            &items,
            d,
            &queries,
            Some((text, keep)),
            false,
            search_k,
        );
        eprintln!(
            "{name}: filter {text} ({:.1}%): recall@10 {r:.3}, exact {ex}",
            sel * 100.0
        );
        assert!(
            r >= want,
            "{name}: filter {text}: recall@10 {r:.3} < {want}"
        );
        // Below half of the index a filter is answered by the exact scan.
        if sel < 0.5 {
            assert!(ex, "{name}: {text}");
        }
    }
}

#[test]
fn recall_on_uniform_vectors_with_and_without_filters() {
    let mut rng = Rng(0x5eed);
    let vectors: Vec<Vec<f32>> = (0..50_000).map(|_| rng.uniform(32)).collect();
    // Uniform vectors are the trees' worst case: few candidates, low recall.
    check_dataset_at(
        "uniform 50k x 32 cosine",
        Distance::Cosine,
        vectors,
        0.3,
        Some(5),
    );
}

#[test]
fn recall_on_clustered_vectors_with_and_without_filters() {
    let mut rng = Rng(0xc1u64);
    let vectors = clustered(&mut rng, 50_000, 64, 500);
    check_dataset(
        "clustered 50k x 64 euclidean",
        Distance::Euclidean,
        vectors.clone(),
        0.95,
    );
    check_dataset("clustered 50k x 64 dot", Distance::Dot, vectors, 0.9);
}

#[test]
fn filters_follow_sql_semantics() {
    let mut rng = Rng(3);
    let vectors: Vec<Vec<f32>> = (0..3000).map(|_| rng.uniform(8)).collect();
    let items = items(&mut rng, vectors);
    let dir = tempfile::tempdir().expect("tempdir");
    let idx =
        VectorIndex::open(dir.path(), "items", &plan(8, Distance::Cosine, true)).expect("open");
    let ups: Vec<VectorUpdate> = items.iter().map(update).collect();
    idx.apply(1, &ups, None, false).expect("apply");
    let snap = idx.snapshot().expect("snapshot");
    type KeepFn = fn(&Item) -> bool;
    let cases: Vec<(&str, KeepFn)> = vec![
        ("tier <= 2", |it| it.tier.is_some_and(|t| t <= 2)),
        ("2 >= tier", |it| it.tier.is_some_and(|t| t <= 2)),
        ("tier > 7 AND in_stock", |it| {
            it.tier.is_some_and(|t| t > 7) && it.in_stock
        }),
        // NULL tiers are neither equal nor unequal to 3.
        ("NOT (tier = 3)", |it| it.tier.is_some_and(|t| t != 3)),
        ("tier <> 3", |it| it.tier.is_some_and(|t| t != 3)),
        ("tier IS NULL OR category = 'c0'", |it| {
            it.tier.is_none() || it.category == "c0"
        }),
        ("tier IS NOT NULL AND NOT in_stock", |it| {
            it.tier.is_some() && !it.in_stock
        }),
        ("tier BETWEEN 3 AND 5", |it| {
            it.tier.is_some_and(|t| (3..=5).contains(&t))
        }),
        ("tier NOT BETWEEN 3 AND 5", |it| {
            it.tier.is_some_and(|t| !(3..=5).contains(&t))
        }),
        ("tier NOT IN (1, 2)", |it| {
            it.tier.is_some_and(|t| t != 1 && t != 2)
        }),
        ("category IN ('c0', 'c11') AND tier >= 9", |it| {
            (it.category == "c0" || it.category == "c11") && it.tier == Some(9)
        }),
        ("in_stock = false OR tier < -1", |it| !it.in_stock),
        ("category > 'c5'", |it| it.category.as_str() > "c5"),
    ];
    for (text, keep) in cases {
        let f = idx.filter(text).expect(text);
        let got: Vec<String> = f
            .eval(&snap)
            .iter()
            .filter_map(|id| snap.key(id).map(|k| k.to_string()))
            .collect();
        let mut got = got;
        got.sort();
        let mut want: Vec<String> = items
            .iter()
            .filter(|it| keep(it))
            .map(|it| it.key.clone())
            .collect();
        want.sort();
        assert_eq!(got, want, "{text}");
    }
    for bad in [
        "colour = 'red'",
        "tier = 'x'",
        "category = 3",
        "tier = 2.5",
        "tier + 1 = 3",
        "tier LIKE 'x%'",
        "category",
        "tier = ",
    ] {
        assert!(
            matches!(
                idx.filter(bad),
                Err(sluice_engine::EngineError::BadRequest(_))
            ),
            "{bad} should be refused"
        );
    }
    // Filter values follow updates and survive a reopen.
    let mut changed = update(&items[0]);
    changed.attrs[0] = Attr::Text("moved".into());
    idx.apply(2, &[changed], None, false).expect("apply");
    drop(snap);
    drop(idx);
    let r = VectorIndex::open_existing(dir.path(), "items").expect("reopen");
    let snap = r.snapshot().expect("snapshot");
    let f = r.filter("category = 'moved'").expect("filter");
    let keys: Vec<String> = f
        .eval(&snap)
        .iter()
        .filter_map(|id| snap.key(id).map(|k| k.to_string()))
        .collect();
    assert_eq!(keys, vec![items[0].key.clone()]);
    let old = r
        .filter(&format!("category = '{}'", items[0].category))
        .expect("filter")
        .eval(&snap);
    assert!(
        old.iter()
            .all(|id| snap.key(id).map(|k| k.as_ref()) != Some("item0"))
    );
}

#[test]
fn a_batch_equals_its_queries_one_by_one() {
    let mut rng = Rng(9);
    let vectors = clustered(&mut rng, 20_000, 16, 50);
    let items = items(&mut rng, vectors);
    let dir = tempfile::tempdir().expect("tempdir");
    let idx =
        VectorIndex::open(dir.path(), "items", &plan(16, Distance::Cosine, true)).expect("open");
    let ups: Vec<VectorUpdate> = items.iter().map(update).collect();
    idx.apply(1, &ups, None, false).expect("apply");
    let qs: Vec<Vec<f32>> = (0..20).map(|_| rng.uniform(16)).collect();
    for exact in [false, true] {
        let batch = Search {
            queries: qs.iter().map(|q| Query::Vector(q)).collect(),
            exact,
            ..Search::one(Query::Key("item1"), 7)
        };
        let all = idx.search(&batch).expect("batch");
        assert_eq!(all.results.len(), qs.len());
        for (q, r) in qs.iter().zip(&all.results) {
            let one = Search {
                exact,
                ..Search::one(Query::Vector(q), 7)
            };
            assert_eq!(&idx.search(&one).expect("one").results[0], r);
        }
    }
    // The exact scan on one thread and on several agree.
    let one = Search {
        exact: true,
        threads: 1,
        ..Search::one(Query::Vector(&qs[0]), 10)
    };
    let many = Search {
        threads: 4,
        ..one.clone()
    };
    assert_eq!(
        idx.search(&one).expect("1").results,
        idx.search(&many).expect("4").results
    );
}

/// Every epoch replaces the whole index with keys named after it: an
/// answer mixing two epochs would hold keys of both.
#[test]
fn a_query_racing_commits_sees_one_epoch() {
    const KEYS: usize = 300;
    const EPOCHS: u64 = 60;
    const DIMS: usize = 8;
    let dims = DIMS;
    fn content(e: u64) -> Vec<Item> {
        (0..KEYS)
            .map(|i| Item {
                key: format!("e{e}-{i}"),
                v: Rng(e * 1_000_003 + i as u64 + 1).uniform(DIMS),
                category: format!("c{}", i % 3),
                tier: Some((i % 10) as i64),
                in_stock: true,
            })
            .collect()
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let idx = Arc::new(
        VectorIndex::open(dir.path(), "v", &plan(dims, Distance::Euclidean, true)).expect("open"),
    );
    let first: Vec<VectorUpdate> = content(1).iter().map(update).collect();
    idx.apply(1, &first, None, false).expect("apply");
    let done = Arc::new(AtomicBool::new(false));
    let checked = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = (0..3)
        .map(|t| {
            let idx = Arc::clone(&idx);
            let done = Arc::clone(&done);
            let checked = Arc::clone(&checked);
            std::thread::spawn(move || {
                let mut rng = Rng(100 + t);
                let f = idx.filter("category = 'c1'").expect("filter");
                while !done.load(Ordering::Acquire) {
                    let q = rng.uniform(dims);
                    let s = Search {
                        exact: t == 0,
                        filter: (t == 2).then_some(&f),
                        ..Search::one(Query::Vector(&q), 10)
                    };
                    let found = idx.search(&s).expect("search");
                    let got = found.results[0].clone().expect("vector query");
                    let epoch = found.epoch.expect("an epoch");
                    let prefix = format!("e{epoch}-");
                    assert_eq!(got.len(), 10);
                    for n in &got {
                        assert!(
                            n.key.starts_with(&prefix),
                            "epoch {epoch} answered with {} (a mix of epochs)",
                            n.key
                        );
                    }
                    if t != 1 {
                        // Exact (or filtered to a third: exact too): the
                        // brute force of that one epoch.
                        let items = content(epoch);
                        let want = brute(Distance::Euclidean, &items, &q, 10, |it| {
                            t != 2 || it.category == "c1"
                        });
                        // The same keys; two at (nearly) equal distances may
                        // swap between the f32 scan and the f64 brute force.
                        let mut keys: Vec<&str> = got.iter().map(|n| n.key.as_str()).collect();
                        let mut wkeys: Vec<&str> = want.iter().map(|w| w.0).collect();
                        keys.sort_unstable();
                        wkeys.sort_unstable();
                        assert_eq!(keys, wkeys, "epoch {epoch}");
                    }
                    checked.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for e in 2..=EPOCHS {
        let mut ups: Vec<VectorUpdate> = content(e - 1)
            .iter()
            .map(|it| VectorUpdate {
                key: it.key.clone(),
                vector: None,
                valid_until: None,
                attrs: Vec::new(),
            })
            .collect();
        ups.extend(content(e).iter().map(update));
        idx.apply(e, &ups, None, false).expect("apply");
    }
    done.store(true, Ordering::Release);
    for r in readers {
        r.join().expect("a reader failed");
    }
    let n = checked.load(Ordering::Relaxed);
    eprintln!("{n} answers checked across {EPOCHS} epochs");
    assert!(n > 100, "only {n} answers checked");
    assert_eq!(idx.len().expect("len"), KEYS as u64);
}
