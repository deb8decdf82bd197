//! Vector features: the `FLOAT[n]` column type and the element-wise
//! aggregates `VECTOR_SUM` and `VECTOR_AVG`, as DataFusion aggregate UDFs.
//!
//! Their state is a running sum (float64, so long windows do not lose
//! precision) and a count, exposed through `state()` like every other
//! accumulator: the engine checkpoints it to RocksDB and merges panes with
//! `merge_batch` without knowing what a vector is.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, FixedSizeListArray, UInt64Array};
use arrow::buffer::NullBuffer;
use arrow::datatypes::{DataType, Field, FieldRef, Float32Type, Float64Type};
use datafusion::common::{Result, ScalarValue, exec_err, plan_err};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, EmitTo, GroupsAccumulator, Signature, Volatility,
};

/// The Arrow type of a `FLOAT[n]` column: a fixed-size list of non-null float32.
pub fn vector_type(dims: i32) -> DataType {
    DataType::FixedSizeList(Arc::new(Field::new("item", DataType::Float32, false)), dims)
}

/// The dimension of a vector type (`FixedSizeList` of float32), if it is one.
pub fn vector_dims(dt: &DataType) -> Option<usize> {
    match dt {
        DataType::FixedSizeList(f, n) if f.data_type() == &DataType::Float32 => {
            usize::try_from(*n).ok()
        }
        _ => None,
    }
}

/// The two element-wise vector aggregates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VectorOp {
    /// `VECTOR_SUM(v)`.
    Sum,
    /// `VECTOR_AVG(v)`.
    Avg,
}

/// `VECTOR_SUM` / `VECTOR_AVG` over a `FLOAT[n]` column; NULL rows are
/// skipped, an empty set gives NULL.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VectorAgg {
    op: VectorOp,
    signature: Signature,
}

impl VectorAgg {
    /// The aggregate for `op`.
    pub fn new(op: VectorOp) -> Self {
        VectorAgg {
            op,
            signature: Signature::any(1, Volatility::Immutable),
        }
    }

    /// The UDAF, to register with a session.
    pub fn udaf(op: VectorOp) -> AggregateUDF {
        AggregateUDF::from(VectorAgg::new(op))
    }
}

fn input_dims(name: &str, dt: &DataType) -> Result<usize> {
    match dt {
        DataType::FixedSizeList(f, n)
            if matches!(f.data_type(), DataType::Float32 | DataType::Float64) =>
        {
            Ok(usize::try_from(*n).unwrap_or(0))
        }
        other => plan_err!("{name} takes a vector column (FLOAT[n]); found {other}"),
    }
}

impl AggregateUDFImpl for VectorAgg {
    fn name(&self) -> &str {
        match self.op {
            VectorOp::Sum => "vector_sum",
            VectorOp::Avg => "vector_avg",
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        let Some(t) = arg_types.first() else {
            return plan_err!("{} takes one argument", self.name());
        };
        let dims = input_dims(self.name(), t)?;
        Ok(vector_type(dims as i32))
    }

    fn is_nullable(&self) -> bool {
        true
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        let dims = match args.return_field.data_type() {
            DataType::FixedSizeList(_, n) => *n,
            _ => 0,
        };
        Ok(vec![
            Arc::new(Field::new(
                format!("{}[sum]", args.name),
                DataType::FixedSizeList(
                    Arc::new(Field::new("item", DataType::Float64, false)),
                    dims,
                ),
                true,
            )),
            Arc::new(Field::new(
                format!("{}[count]", args.name),
                DataType::UInt64,
                false,
            )),
        ])
    }

    fn accumulator(&self, acc_args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        let dims = input_dims(self.name(), acc_args.return_field.data_type())?;
        Ok(Box::new(OneGroup(VectorGroups::new(self.op, dims))))
    }

    fn groups_accumulator_supported(&self, _args: AccumulatorArgs) -> bool {
        true
    }

    fn create_groups_accumulator(
        &self,
        args: AccumulatorArgs,
    ) -> Result<Box<dyn GroupsAccumulator>> {
        let dims = input_dims(self.name(), args.return_field.data_type())?;
        Ok(Box::new(VectorGroups::new(self.op, dims)))
    }
}

/// Per-group running sums (`dims` float64 each) and counts.
#[derive(Debug, Clone)]
struct VectorGroups {
    op: VectorOp,
    dims: usize,
    sums: Vec<f64>,
    counts: Vec<u64>,
}

impl VectorGroups {
    fn new(op: VectorOp, dims: usize) -> Self {
        VectorGroups {
            op,
            dims,
            sums: Vec::new(),
            counts: Vec::new(),
        }
    }

    fn resize(&mut self, groups: usize) {
        if self.counts.len() < groups {
            self.counts.resize(groups, 0);
            self.sums.resize(groups * self.dims, 0.0);
        }
    }

    /// Adds row `row` of `values` (a fixed-size list of `dims` floats) to group `g`.
    fn add(&mut self, g: usize, values: &FixedSizeListArray, row: usize, count: u64) -> Result<()> {
        let child = values.values();
        let start = values.value_offset(row) as usize;
        let dst = &mut self.sums[g * self.dims..(g + 1) * self.dims];
        match child.data_type() {
            DataType::Float32 => {
                let src = &child.as_primitive::<Float32Type>().values()[start..start + self.dims];
                for (d, s) in dst.iter_mut().zip(src) {
                    *d += f64::from(*s);
                }
            }
            DataType::Float64 => {
                let src = &child.as_primitive::<Float64Type>().values()[start..start + self.dims];
                for (d, s) in dst.iter_mut().zip(src) {
                    *d += *s;
                }
            }
            other => return exec_err!("vector aggregate over {other}"),
        }
        self.counts[g] += count;
        Ok(())
    }

    fn list<'a>(&self, a: &'a ArrayRef) -> Result<&'a FixedSizeListArray> {
        let l = a.as_fixed_size_list_opt().ok_or_else(|| {
            datafusion::error::DataFusionError::Execution(format!(
                "vector aggregate input is {}, not a vector",
                a.data_type()
            ))
        })?;
        if l.value_length() as usize != self.dims {
            return exec_err!(
                "vector of {} elements where {} were declared",
                l.value_length(),
                self.dims
            );
        }
        Ok(l)
    }

    fn take(&mut self, emit_to: EmitTo) -> (Vec<f64>, Vec<u64>) {
        let counts = emit_to.take_needed(&mut self.counts);
        let n = counts.len() * self.dims;
        let sums = if n == self.sums.len() {
            std::mem::take(&mut self.sums)
        } else {
            let rest = self.sums.split_off(n);
            std::mem::replace(&mut self.sums, rest)
        };
        (sums, counts)
    }
}

impl GroupsAccumulator for VectorGroups {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> Result<()> {
        self.resize(total_num_groups);
        let Some(v) = values.first() else {
            return Ok(());
        };
        let l = self.list(v)?;
        for (row, g) in group_indices.iter().enumerate() {
            if l.is_null(row) || opt_filter.is_some_and(|f| !f.is_valid(row) || !f.value(row)) {
                continue;
            }
            self.add(*g, l, row, 1)?;
        }
        Ok(())
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> Result<ArrayRef> {
        let (sums, counts) = self.take(emit_to);
        let dims = self.dims;
        let mut out = Vec::with_capacity(sums.len());
        for (g, c) in counts.iter().enumerate() {
            let s = &sums[g * dims..(g + 1) * dims];
            match (self.op, *c) {
                (_, 0) => out.extend(std::iter::repeat_n(0f32, dims)),
                (VectorOp::Sum, _) => out.extend(s.iter().map(|x| *x as f32)),
                (VectorOp::Avg, c) => out.extend(s.iter().map(|x| (*x / c as f64) as f32)),
            }
        }
        let nulls = NullBuffer::from(counts.iter().map(|c| *c > 0).collect::<Vec<_>>());
        let arr = FixedSizeListArray::try_new(
            Arc::new(Field::new("item", DataType::Float32, false)),
            dims as i32,
            Arc::new(arrow::array::Float32Array::from(out)),
            Some(nulls),
        )?;
        Ok(Arc::new(arr))
    }

    fn state(&mut self, emit_to: EmitTo) -> Result<Vec<ArrayRef>> {
        let (sums, counts) = self.take(emit_to);
        let arr = FixedSizeListArray::try_new(
            Arc::new(Field::new("item", DataType::Float64, false)),
            self.dims as i32,
            Arc::new(arrow::array::Float64Array::from(sums)),
            None,
        )?;
        Ok(vec![Arc::new(arr), Arc::new(UInt64Array::from(counts))])
    }

    fn merge_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        total_num_groups: usize,
    ) -> Result<()> {
        self.resize(total_num_groups);
        let (Some(s), Some(c)) = (values.first(), values.get(1)) else {
            return exec_err!("vector aggregate state needs sums and counts");
        };
        let l = self.list(s)?;
        let Some(c) = c.as_primitive_opt::<arrow::datatypes::UInt64Type>() else {
            return exec_err!("vector aggregate count state is {}", c.data_type());
        };
        for (row, g) in group_indices.iter().enumerate() {
            if l.is_null(row) || c.is_null(row) || c.value(row) == 0 {
                continue;
            }
            self.add(*g, l, row, c.value(row))?;
        }
        Ok(())
    }

    fn convert_to_state(
        &self,
        values: &[ArrayRef],
        opt_filter: Option<&BooleanArray>,
    ) -> Result<Vec<ArrayRef>> {
        // Each input row becomes its own group's state.
        let n = values.first().map(|v| v.len()).unwrap_or(0);
        let mut g = VectorGroups::new(self.op, self.dims);
        let idx: Vec<usize> = (0..n).collect();
        g.update_batch(values, &idx, opt_filter, n)?;
        g.state(EmitTo::All)
    }

    fn size(&self) -> usize {
        self.sums.capacity() * 8 + self.counts.capacity() * 8 + std::mem::size_of::<Self>()
    }
}

/// The ungrouped accumulator: one group of [`VectorGroups`].
#[derive(Debug)]
struct OneGroup(VectorGroups);

impl Accumulator for OneGroup {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let n = values.first().map(|v| v.len()).unwrap_or(0);
        self.0.update_batch(values, &vec![0; n], None, 1)
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        // Evaluating takes the group out: work on a copy.
        let mut g = self.0.clone();
        g.resize(1);
        ScalarValue::try_from_array(&g.evaluate(EmitTo::All)?, 0)
    }

    fn size(&self) -> usize {
        self.0.size()
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        let mut g = self.0.clone();
        g.resize(1);
        g.state(EmitTo::All)?
            .iter()
            .map(|a| ScalarValue::try_from_array(a, 0))
            .collect()
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let n = states.first().map(|v| v.len()).unwrap_or(0);
        self.0.merge_batch(states, &vec![0; n], 1)
    }
}

/// How an index measures the distance between two vectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Distance {
    /// 1 − cosine similarity (arroy reports the angular distance).
    Cosine,
    /// Euclidean (L2) distance.
    Euclidean,
    /// Dot product: the larger the product, the nearer.
    Dot,
}

impl Distance {
    /// Parses a `distance` option value.
    pub fn parse(s: &str) -> Option<Distance> {
        match s.to_ascii_lowercase().as_str() {
            "cosine" | "angular" => Some(Distance::Cosine),
            "euclidean" | "l2" => Some(Distance::Euclidean),
            "dot" | "dot_product" | "inner_product" => Some(Distance::Dot),
            _ => None,
        }
    }

    /// The option value naming this distance.
    pub fn name(&self) -> &'static str {
        match self {
            Distance::Cosine => "cosine",
            Distance::Euclidean => "euclidean",
            Distance::Dot => "dot",
        }
    }
}

/// A view's nearest-neighbour index (`vector_index = 'col'`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VectorIndexPlan {
    /// The indexed output column (a `FLOAT[n]`).
    pub column: String,
    /// Its dimension.
    pub dims: usize,
    /// `distance`.
    pub distance: Distance,
    /// `index_trees`: trees to build; `None` lets arroy decide from the item count.
    pub trees: Option<usize>,
    /// `search_k`: tree nodes a query visits per result; `None`: the default.
    pub search_k: Option<usize>,
    /// `index_filter_columns`: output columns a query can filter its
    /// neighbours by (kept beside the vectors as bitmaps of their values).
    #[serde(default)]
    pub filter_columns: Vec<FilterColumn>,
}

/// A column nearest-neighbour queries can filter by.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FilterColumn {
    /// The view's output column.
    pub name: String,
    /// What its values are.
    pub kind: FilterKind,
}

/// The value kinds a filter column can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FilterKind {
    /// Any integer type (compared as i64).
    Integer,
    /// UTF-8 text.
    Text,
    /// Booleans.
    Boolean,
}

impl FilterKind {
    /// The kind of an Arrow type, if a filter column can have it.
    pub fn of(dt: &DataType) -> Option<FilterKind> {
        match dt {
            DataType::Int8
            | DataType::Int16
            | DataType::Int32
            | DataType::Int64
            | DataType::UInt8
            | DataType::UInt16
            | DataType::UInt32
            | DataType::UInt64 => Some(FilterKind::Integer),
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => Some(FilterKind::Text),
            DataType::Boolean => Some(FilterKind::Boolean),
            _ => None,
        }
    }
}
