//! A bounded source over record batches already in memory (benchmarks,
//! embedding). Its position is the number of rows returned.

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use sluice_engine::{EngineError, Poll, Result, Source, SourceBatch};

/// Yields the given batches, then ends.
pub struct MemorySource {
    name: String,
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
    next: usize,
    rows: u64,
}

impl MemorySource {
    /// A source named `name` over `batches` (all of `schema`).
    pub fn new(name: &str, schema: SchemaRef, batches: Vec<RecordBatch>) -> Self {
        MemorySource {
            name: name.to_string(),
            schema,
            batches,
            next: 0,
            rows: 0,
        }
    }
}

impl Source for MemorySource {
    fn name(&self) -> &str {
        &self.name
    }

    fn schema(&self) -> SchemaRef {
        std::sync::Arc::clone(&self.schema)
    }

    fn seek(&mut self, position: Option<&[u8]>) -> Result<()> {
        let target: u64 = match position {
            None => 0,
            Some(p) => String::from_utf8_lossy(p)
                .parse()
                .map_err(|_| EngineError::Connector {
                    what: format!("source {}", self.name),
                    message: "bad position".into(),
                })?,
        };
        self.next = 0;
        self.rows = 0;
        while self.next < self.batches.len()
            && self.rows + self.batches[self.next].num_rows() as u64 <= target
        {
            self.rows += self.batches[self.next].num_rows() as u64;
            self.next += 1;
        }
        Ok(())
    }

    fn poll(&mut self, _max_rows: usize) -> Result<Poll> {
        let Some(b) = self.batches.get(self.next) else {
            return Ok(Poll::End);
        };
        let positions = (self.rows..self.rows + b.num_rows() as u64).collect();
        self.rows += b.num_rows() as u64;
        self.next += 1;
        Ok(Poll::Data {
            batch: Some(SourceBatch {
                batch: b.clone(),
                row_positions: positions,
                partitions: Vec::new(),
            }),
            rejected: Vec::new(),
        })
    }

    fn position(&self) -> Vec<u8> {
        self.rows.to_string().into_bytes()
    }

    fn describe_position(&self, pos: u64) -> String {
        format!("{}#{pos}", self.name)
    }
}
