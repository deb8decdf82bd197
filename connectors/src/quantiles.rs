//! One t-digest, several quantiles: an aggregate that answers a fixed list
//! of quantiles of its argument from a single digest.
//!
//! `approx_percentile_cont(q)` keeps one digest per call, and every call
//! sorts every input batch again, so nine quantiles of a feature cost nine
//! sorts of each batch. This aggregate feeds DataFusion's own
//! `approx_percentile_cont` accumulator once and reads each quantile from
//! its digest, so its answers are exactly those of the nine calls (same
//! digest, same batches, same merges) at the cost of one.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, FieldRef};
use datafusion::common::{Result, ScalarValue};
use datafusion::functions_aggregate::approx_percentile_cont::{
    ApproxPercentileAccumulator, ApproxPercentileCont,
};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, Signature, Volatility,
};
use datafusion_functions_aggregate_common::tdigest::TDigest;

/// `name(x DOUBLE)`: a list of `quantiles.len()` doubles, the estimates of
/// each quantile of the non-NULL `x` (NULL when every `x` is NULL).
pub fn digest_quantiles(name: &'static str, quantiles: &'static [f64]) -> AggregateUDF {
    AggregateUDF::from(DigestQuantiles {
        name,
        quantiles,
        signature: Signature::exact(vec![DataType::Float64], Volatility::Immutable),
    })
}

#[derive(Debug)]
struct DigestQuantiles {
    name: &'static str,
    quantiles: &'static [f64],
    signature: Signature,
}

// One name, one list of quantiles: the name identifies the function.
impl PartialEq for DigestQuantiles {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl Eq for DigestQuantiles {}

impl Hash for DigestQuantiles {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.name.hash(state);
    }
}

impl AggregateUDFImpl for DigestQuantiles {
    fn name(&self) -> &str {
        self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::new_list(DataType::Float64, true))
    }

    // The digest's state, as `approx_percentile_cont` declares it.
    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        ApproxPercentileCont::new().state_fields(args)
    }

    fn accumulator(&self, _args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        Ok(Box::new(QuantilesAccumulator {
            digest: ApproxPercentileAccumulator::new(0.5, DataType::Float64),
            quantiles: self.quantiles,
        }))
    }
}

#[derive(Debug)]
struct QuantilesAccumulator {
    /// DataFusion's accumulator keeps the digest; its own quantile is unused.
    digest: ApproxPercentileAccumulator,
    quantiles: &'static [f64],
}

impl Accumulator for QuantilesAccumulator {
    fn update_batch(&mut self, values: &[arrow::array::ArrayRef]) -> Result<()> {
        self.digest.update_batch(values)
    }

    fn merge_batch(&mut self, states: &[arrow::array::ArrayRef]) -> Result<()> {
        self.digest.merge_batch(states)
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        self.digest.state()
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        let digest = TDigest::from_scalar_state(&self.digest.state()?);
        let item = Arc::new(Field::new_list_field(DataType::Float64, true));
        if digest.count() == 0.0 {
            return Ok(ScalarValue::List(Arc::new(
                arrow::array::ListArray::new_null(item, 1),
            )));
        }
        let values: Vec<ScalarValue> = self
            .quantiles
            .iter()
            .map(|q| ScalarValue::Float64(Some(digest.estimate_quantile(*q))))
            .collect();
        Ok(ScalarValue::List(ScalarValue::new_list_nullable(
            &values,
            &DataType::Float64,
        )))
    }

    fn size(&self) -> usize {
        self.digest.size() + size_of::<&'static [f64]>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, Float64Array, Int64Array, ListArray, RecordBatch};
    use arrow::datatypes::Schema;
    use datafusion::datasource::MemTable;
    use datafusion::prelude::{SessionConfig, SessionContext};

    const QS: [f64; 5] = [0.01, 0.25, 0.5, 0.9, 0.99];

    // A skewed column with NULLs in four groups, split over several
    // batches and partitions so partial states are merged.
    fn table() -> MemTable {
        let schema = Arc::new(Schema::new(vec![
            Field::new("g", DataType::Int64, false),
            Field::new("x", DataType::Float64, true),
        ]));
        let mut parts = Vec::new();
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..3 {
            let mut batches = Vec::new();
            for _ in 0..4 {
                let (mut g, mut x) = (Vec::new(), Vec::new());
                for _ in 0..2500 {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    let u = (state >> 11) as f64 / (1u64 << 53) as f64;
                    g.push((state % 4) as i64);
                    x.push((!state.is_multiple_of(17)).then(|| (u * 6.0).exp()));
                }
                batches.push(
                    RecordBatch::try_new(
                        Arc::clone(&schema),
                        vec![
                            Arc::new(Int64Array::from(g)),
                            Arc::new(Float64Array::from(x)),
                        ],
                    )
                    .expect("batch"),
                );
            }
            parts.push(batches);
        }
        MemTable::try_new(schema, parts).expect("table")
    }

    #[tokio::test]
    async fn one_digest_answers_what_each_percentile_call_answers() {
        for partitions in [1, 3] {
            let ctx = SessionContext::new_with_config(
                SessionConfig::new().with_target_partitions(partitions),
            );
            ctx.register_udaf(digest_quantiles("qs", &QS));
            ctx.register_table("t", Arc::new(table()))
                .expect("register");
            let calls: Vec<String> = QS
                .iter()
                .map(|q| format!("approx_percentile_cont({q}) WITHIN GROUP (ORDER BY x)"))
                .collect();
            let sql = format!(
                "SELECT g, qs(x) AS qs, {} FROM t GROUP BY g \
                 UNION ALL SELECT 9, qs(x), {} FROM t WHERE g > 9 ORDER BY g",
                calls.join(", "),
                calls.join(", ")
            );
            let batches = ctx
                .sql(&sql)
                .await
                .expect("plan")
                .collect()
                .await
                .expect("run");
            let mut groups = 0;
            for b in &batches {
                let lists = b
                    .column(1)
                    .as_any()
                    .downcast_ref::<ListArray>()
                    .expect("list");
                for row in 0..b.num_rows() {
                    groups += 1;
                    let g = b
                        .column(0)
                        .as_any()
                        .downcast_ref::<Int64Array>()
                        .expect("g")
                        .value(row);
                    if g == 9 {
                        // No rows: NULL, like each call's NULL.
                        assert!(lists.is_null(row));
                        for k in 0..QS.len() {
                            assert!(b.column(2 + k).is_null(row));
                        }
                        continue;
                    }
                    let got = lists.value(row);
                    let got = got
                        .as_any()
                        .downcast_ref::<Float64Array>()
                        .expect("doubles");
                    assert_eq!(got.len(), QS.len());
                    for (k, q) in QS.iter().enumerate() {
                        let want = b
                            .column(2 + k)
                            .as_any()
                            .downcast_ref::<Float64Array>()
                            .expect("double")
                            .value(row);
                        assert_eq!(got.value(k).to_bits(), want.to_bits(), "group {g}, q {q}");
                    }
                }
            }
            assert_eq!(groups, 5);
        }
    }
}
