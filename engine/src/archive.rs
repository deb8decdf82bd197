//! The event archive's layout: a source's columns, then the columns that
//! say when and how each accepted event arrived (its checkpoint, its order,
//! its partition and offset, the watermark its late rule used, the clocks
//! around it). `sluice run` writes it; replays read it.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

/// Columns an event archive adds to a source's own, in this order.
pub mod archive_columns {
    /// The checkpoint (epoch) that committed the row.
    pub const EPOCH: &str = "_sluice_epoch";
    /// Arrival order within the epoch.
    pub const SEQ: &str = "_sluice_seq";
    /// The source partition (Kafka), NULL for a one-partition source.
    pub const PARTITION: &str = "_sluice_partition";
    /// The record's offset in its partition (Kafka), or its line (files).
    pub const OFFSET: &str = "_sluice_offset";
    /// The watermark the late rule compared the row with (NULL: none yet).
    pub const WATERMARK: &str = "_sluice_watermark";
    /// The clock readers saw before this checkpoint (NULL: none yet).
    pub const CLOCK_BEFORE: &str = "_sluice_clock_before";
    /// The clock (watermark) this checkpoint committed.
    pub const CLOCK: &str = "_sluice_clock";
    /// Every column, in order.
    pub const ALL: [&str; 7] = [
        EPOCH,
        SEQ,
        PARTITION,
        OFFSET,
        WATERMARK,
        CLOCK_BEFORE,
        CLOCK,
    ];
}

/// The schema of a source's event archive: its columns, then
/// [`archive_columns::ALL`].
pub fn archive_schema(source: &Schema) -> SchemaRef {
    let mut fields: Vec<Field> = source.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.push(Field::new(archive_columns::EPOCH, DataType::UInt64, false));
    fields.push(Field::new(archive_columns::SEQ, DataType::UInt64, false));
    fields.push(Field::new(
        archive_columns::PARTITION,
        DataType::Int32,
        true,
    ));
    fields.push(Field::new(archive_columns::OFFSET, DataType::Int64, true));
    fields.push(Field::new(
        archive_columns::WATERMARK,
        DataType::Int64,
        true,
    ));
    fields.push(Field::new(
        archive_columns::CLOCK_BEFORE,
        DataType::Int64,
        true,
    ));
    fields.push(Field::new(archive_columns::CLOCK, DataType::Int64, true));
    Arc::new(Schema::new(fields))
}
