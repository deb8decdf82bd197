//! Protobuf payloads of Kafka sources (`format = 'protobuf'`), read
//! straight from the wire format into Arrow builders, record by record, so
//! one record that does not decode is dead-lettered alone. The descriptors
//! (prost-reflect, from protox) say which field numbers the declared
//! columns are and how their values are encoded; the decoder walks each
//! record's fields once, keeps where the declared ones are, skips the rest
//! (groups included), and follows Protobuf's merge rules: the last value of
//! a scalar wins, repeated fields concatenate (packed or not), messages
//! merge field by field, and a oneof member is unset by a later member.
//!
//! The source's `schema` file (`.proto`, compiled here by protox, imports
//! resolved beside it and the well-known types built in) and its `message`
//! name the reader message. Declared columns are its fields, matched by
//! name; every record is read as that message, so fields a writer added
//! are skipped and fields it dropped read as absent, as Protobuf's own
//! compatibility rules have it. Records are framed as
//! Confluent's serializers write them (`framing = 'confluent'`: a zero
//! byte, a 4-byte big-endian schema id, the message indexes, the body) or
//! carry the body alone (`framing = 'none'`). With `schema.<id> = 'FILE'`
//! options only the mapped ids are read, and a record's message indexes
//! must name the reader message in its id's file.
//!
//! Types: `string` and enums (by value name) fill TEXT; integers fill
//! BIGINT, INT and SMALLINT when they fit; `double`, `float` and integers
//! fill DOUBLE; `float` fills FLOAT; `bool` fills BOOLEAN;
//! `google.protobuf.Timestamp` fills TIMESTAMP; `repeated float` or
//! `repeated double` fills FLOAT[n]. The `google.protobuf.*Value` wrappers
//! and fields with presence (`optional`, message and oneof fields) read
//! as NULL when absent; plain proto3 scalars read as their default.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    ArrayBuilder, ArrayRef, BooleanBuilder, FixedSizeListBuilder, Float32Builder, Float64Builder,
    Int16Builder, Int32Builder, Int64Builder, RecordBatch, StringBuilder,
    TimestampMillisecondBuilder,
};
use arrow::datatypes::{DataType, FieldRef, Schema, SchemaRef};
use prost_reflect::{DescriptorPool, FieldDescriptor, Kind, MessageDescriptor};
use sluice_engine::{DeadLetter, DeadLetterKind, EngineError, Result};

use crate::avro::Framing;
use crate::json::{Reject, Span};

/// The Protobuf options of a Kafka source.
#[derive(Debug, Clone)]
pub struct ProtobufOptions {
    /// `schema`: the `.proto` file of the reader message, resolved against
    /// the pipeline's folder.
    pub schema: PathBuf,
    /// `message`: the reader message, by full or simple name.
    pub message: String,
    /// `framing` (default `confluent`).
    pub framing: Framing,
    /// `schema.<id>`: writer `.proto` files by Confluent schema id.
    pub writers: BTreeMap<u32, PathBuf>,
}

/// A compiled `.proto` file: its descriptors and its name in the pool.
struct ProtoFile {
    pool: DescriptorPool,
    name: String,
    label: String,
}

impl ProtoFile {
    fn compile(path: &Path) -> std::result::Result<Self, String> {
        let label = path.display().to_string();
        if !path.is_file() {
            return Err(format!("cannot read Protobuf schema {label}: no such file"));
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| format!("{label} names no file"))?;
        let mut c = protox::Compiler::new([dir])
            .map_err(|e| format!("cannot read Protobuf schema {label}: {e}"))?;
        c.include_imports(true);
        c.open_file(&name).map_err(|e| {
            format!(
                "{label} is not a usable Protobuf schema: {}",
                describe(&e, dir)
            )
        })?;
        Ok(ProtoFile {
            pool: c.descriptor_pool(),
            name,
            label,
        })
    }

    /// Every message the file defines, nested ones included, in order.
    fn messages(&self) -> Vec<MessageDescriptor> {
        fn walk(m: MessageDescriptor, out: &mut Vec<MessageDescriptor>) {
            if m.is_map_entry() {
                return;
            }
            let children: Vec<_> = m.child_messages().collect();
            out.push(m);
            for c in children {
                walk(c, out);
            }
        }
        let mut out = Vec::new();
        if let Some(f) = self.pool.get_file_by_name(&self.name) {
            for m in f.messages() {
                walk(m, &mut out);
            }
        }
        out
    }

    /// The message `want` (a full name, or a simple name defined once).
    fn message(&self, want: &str) -> std::result::Result<MessageDescriptor, String> {
        let all = self.messages();
        let found: Vec<&MessageDescriptor> = all
            .iter()
            .filter(|m| m.full_name() == want || m.name() == want)
            .collect();
        match found.as_slice() {
            [one] => Ok((*one).clone()),
            [] => {
                let names: Vec<&str> = all.iter().map(|m| m.full_name()).collect();
                Err(format!(
                    "{} defines no message `{want}` (its messages: {})",
                    self.label,
                    if names.is_empty() {
                        "none".to_string()
                    } else {
                        names.join(", ")
                    }
                ))
            }
            many => {
                let names: Vec<&str> = many.iter().map(|m| m.full_name()).collect();
                Err(format!(
                    "`{want}` names {} messages in {} ({}); give the full name",
                    many.len(),
                    self.label,
                    names.join(", ")
                ))
            }
        }
    }

    /// The message Confluent's message indexes name: the first index picks
    /// a top-level message of the file, each next one a message nested in
    /// the one before.
    fn by_indexes(&self, indexes: &[i64]) -> Option<MessageDescriptor> {
        let file = self.pool.get_file_by_name(&self.name)?;
        let (first, rest) = indexes.split_first()?;
        let mut m = file.messages().nth(usize::try_from(*first).ok()?)?;
        for i in rest {
            let child = m.child_messages().nth(usize::try_from(*i).ok()?)?;
            m = child;
        }
        Some(m)
    }
}

/// A protox error with the file, line and column it points at, if any
/// (`dir`: the folder imports are resolved in).
fn describe(e: &protox::Error, dir: &Path) -> String {
    use miette::Diagnostic as _;
    let text = e.to_string();
    let at = e.labels().and_then(|mut l| l.next()).map(|l| l.offset());
    let src = e
        .file()
        .and_then(|f| std::fs::read_to_string(dir.join(f)).ok());
    match (at, src, e.file()) {
        (Some(off), Some(src), Some(file)) => {
            let before = &src[..off.min(src.len())];
            let line = before.matches('\n').count() + 1;
            let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("{file}:{line}:{col}: {text}")
        }
        (_, _, Some(file)) if !text.contains(file) => format!("{file}: {text}"),
        _ => text,
    }
}

/// How a field's values become a column's.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Conv {
    /// `string`.
    Text,
    /// An enum, by value name (its number when the name is unknown).
    EnumName,
    /// An integer kept within a range.
    Int {
        min: i64,
        max: i64,
    },
    Float64,
    Float32,
    Bool,
    /// `google.protobuf.Timestamp` to milliseconds.
    Timestamp,
    /// `repeated float|double` of exactly this length.
    Vector(usize),
}

/// A declared column and the field that fills it.
#[derive(Debug, Clone)]
struct Column {
    field: FieldDescriptor,
    /// The field's kind, number and presence, looked up once.
    kind: Kind,
    number: u32,
    presence: bool,
    /// A wrapper's value kind.
    inner: Option<Kind>,
    /// The field is a `google.protobuf.*Value` wrapper: its `value` is read.
    wrapped: bool,
    conv: Conv,
    /// The column's declared type, for messages.
    sql: &'static str,
    nullable: bool,
}

fn sql_type(t: &DataType) -> &'static str {
    match t {
        DataType::Utf8 => "TEXT",
        DataType::Float64 => "DOUBLE",
        DataType::Float32 => "FLOAT",
        DataType::Int64 => "BIGINT",
        DataType::Int32 => "INT",
        DataType::Int16 => "SMALLINT",
        DataType::Boolean => "BOOLEAN",
        DataType::Timestamp(..) => "TIMESTAMP",
        DataType::Date32 => "DATE",
        DataType::FixedSizeList(..) => "FLOAT[n]",
        _ => "this type",
    }
}

/// The scalar kind a wrapper message holds, if `m` is one.
fn wrapper_kind(m: &MessageDescriptor) -> Option<Kind> {
    match m.full_name() {
        "google.protobuf.DoubleValue"
        | "google.protobuf.FloatValue"
        | "google.protobuf.Int64Value"
        | "google.protobuf.UInt64Value"
        | "google.protobuf.Int32Value"
        | "google.protobuf.UInt32Value"
        | "google.protobuf.BoolValue"
        | "google.protobuf.StringValue" => m.get_field(1).map(|f| f.kind()),
        _ => None,
    }
}

/// The Protobuf name of a field's type, for messages.
fn proto_type(f: &FieldDescriptor) -> String {
    let base = match f.kind() {
        Kind::Message(m) => m.full_name().to_string(),
        Kind::Enum(e) => format!("enum {}", e.full_name()),
        k => format!("{k:?}"),
    };
    if f.is_map() {
        "map".into()
    } else if f.is_list() {
        format!("repeated {base}")
    } else {
        base
    }
}

fn int_range(k: &Kind) -> Option<(i64, i64)> {
    match k {
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => Some((i32::MIN.into(), i32::MAX.into())),
        Kind::Uint32 | Kind::Fixed32 => Some((0, u32::MAX.into())),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 | Kind::Uint64 | Kind::Fixed64 => {
            Some((i64::MIN, i64::MAX))
        }
        _ => None,
    }
}

/// How field `f` fills a column of type `want`, or `None` if it cannot.
fn conv_for(want: &DataType, f: &FieldDescriptor) -> Option<(Conv, bool)> {
    if f.is_map() {
        return None;
    }
    if f.is_list() {
        return match (want, f.kind()) {
            (DataType::FixedSizeList(_, n), Kind::Float | Kind::Double) => {
                Some((Conv::Vector(usize::try_from(*n).ok()?), false))
            }
            _ => None,
        };
    }
    let (kind, wrapped) = match f.kind() {
        Kind::Message(m) if m.full_name() == "google.protobuf.Timestamp" => {
            return matches!(want, DataType::Timestamp(..)).then_some((Conv::Timestamp, false));
        }
        Kind::Message(m) => (wrapper_kind(&m)?, true),
        k => (k, false),
    };
    let narrow = |lo: i64, hi: i64| {
        int_range(&kind).map(|(a, b)| Conv::Int {
            min: a.max(lo),
            max: b.min(hi),
        })
    };
    let conv = match want {
        DataType::Utf8 => match kind {
            Kind::String => Some(Conv::Text),
            Kind::Enum(_) => Some(Conv::EnumName),
            _ => None,
        },
        // Values outside the column's range are rejected record by record.
        DataType::Int64 => narrow(i64::MIN, i64::MAX),
        DataType::Int32 => narrow(i32::MIN.into(), i32::MAX.into()),
        DataType::Int16 => narrow(i16::MIN.into(), i16::MAX.into()),
        DataType::Float64 => match kind {
            Kind::Double | Kind::Float => Some(Conv::Float64),
            k if int_range(&k).is_some() => Some(Conv::Float64),
            _ => None,
        },
        DataType::Float32 => matches!(kind, Kind::Float).then_some(Conv::Float32),
        DataType::Boolean => matches!(kind, Kind::Bool).then_some(Conv::Bool),
        _ => None,
    }?;
    Some((conv, wrapped))
}

/// Matches the declared payload columns to fields of `m`; the error names
/// the column, both types and the file.
fn plan_columns(
    payload: &Schema,
    m: &MessageDescriptor,
    label: &str,
) -> std::result::Result<Vec<Column>, String> {
    let mut cols = Vec::new();
    for f in payload.fields() {
        let Some(fd) = m.get_field_by_name(f.name()) else {
            let names: Vec<String> = m.fields().map(|f| f.name().to_string()).collect();
            return Err(format!(
                "column `{}` is not a field of message {} in {label} (its fields: {})",
                f.name(),
                m.full_name(),
                names.join(", ")
            ));
        };
        let sql = sql_type(f.data_type());
        let Some((conv, wrapped)) = conv_for(f.data_type(), &fd) else {
            let hint = match f.data_type() {
                DataType::Timestamp(..) => "; TIMESTAMP columns read google.protobuf.Timestamp",
                DataType::Date32 => "; DATE columns are not read from Protobuf",
                DataType::FixedSizeList(..) => {
                    "; vector columns read repeated float or repeated double"
                }
                _ => "",
            };
            return Err(format!(
                "column `{}` is {sql} in the pipeline but {} in message {} of {label}{hint}",
                f.name(),
                proto_type(&fd),
                m.full_name()
            ));
        };
        let inner = match fd.kind() {
            Kind::Message(m) if wrapped => wrapper_kind(&m),
            _ => None,
        };
        cols.push(Column {
            kind: fd.kind(),
            number: fd.number(),
            presence: fd.supports_presence(),
            inner,
            field: fd,
            wrapped,
            conv,
            sql,
            nullable: f.is_nullable(),
        });
    }
    Ok(cols)
}

/// Checks a writer file against the reader message: it defines a message
/// of the same full name, and the fields the columns read keep their
/// number and type there.
fn check_writer(
    writer: &ProtoFile,
    reader: &MessageDescriptor,
    cols: &[Column],
) -> std::result::Result<(), String> {
    let w = writer.message(reader.full_name())?;
    for c in cols {
        let Some(wf) = w.get_field(c.field.number()) else {
            continue;
        };
        // Types by name: the two files' descriptors live in separate pools.
        if proto_type(&wf) != proto_type(&c.field) {
            return Err(format!(
                "field {} is `{}` {} in {} but `{}` {} in the reader schema",
                wf.number(),
                wf.name(),
                proto_type(&wf),
                writer.label,
                c.field.name(),
                proto_type(&c.field)
            ));
        }
    }
    Ok(())
}

/// The reader message, the columns and the writer files by id.
struct Loaded {
    message: MessageDescriptor,
    reader: ProtoFile,
    columns: Vec<Column>,
    writers: BTreeMap<u32, ProtoFile>,
}

/// Loads and checks the schemas of `o` for a source of `payload` columns.
/// The error is a message for the option it names.
fn load_checked(
    o: &ProtobufOptions,
    payload: &Schema,
) -> std::result::Result<Loaded, (String, String)> {
    let reader = ProtoFile::compile(&o.schema).map_err(|e| ("schema".to_string(), e))?;
    let message = reader
        .message(&o.message)
        .map_err(|e| ("message".to_string(), e))?;
    let columns =
        plan_columns(payload, &message, &reader.label).map_err(|e| ("schema".to_string(), e))?;
    let mut writers = BTreeMap::new();
    for (id, path) in &o.writers {
        let key = format!("schema.{id}");
        let w = ProtoFile::compile(path).map_err(|e| (key.clone(), e))?;
        check_writer(&w, &message, &columns).map_err(|e| (key.clone(), e))?;
        writers.insert(*id, w);
    }
    Ok(Loaded {
        message,
        reader,
        columns,
        writers,
    })
}

/// [`load_checked`] at plan time: whether the schemas of `o` fit.
pub(crate) fn check(
    o: &ProtobufOptions,
    payload: &Schema,
) -> std::result::Result<(), (String, String)> {
    load_checked(o, payload).map(|_| ())
}

/// One column's builder.
enum Builder {
    Text(StringBuilder),
    Int64(Int64Builder),
    Int32(Int32Builder),
    Int16(Int16Builder),
    Float64(Float64Builder),
    Float32(Float32Builder),
    Bool(BooleanBuilder),
    Timestamp(TimestampMillisecondBuilder, DataType),
    Vector(FixedSizeListBuilder<Float32Builder>),
}

impl Builder {
    fn new(f: &FieldRef) -> std::result::Result<Self, String> {
        Ok(match f.data_type() {
            DataType::Utf8 => Builder::Text(StringBuilder::new()),
            DataType::Int64 => Builder::Int64(Int64Builder::new()),
            DataType::Int32 => Builder::Int32(Int32Builder::new()),
            DataType::Int16 => Builder::Int16(Int16Builder::new()),
            DataType::Float64 => Builder::Float64(Float64Builder::new()),
            DataType::Float32 => Builder::Float32(Float32Builder::new()),
            DataType::Boolean => Builder::Bool(BooleanBuilder::new()),
            t @ DataType::Timestamp(..) => {
                Builder::Timestamp(TimestampMillisecondBuilder::new(), t.clone())
            }
            DataType::FixedSizeList(item, n) => Builder::Vector(
                FixedSizeListBuilder::new(Float32Builder::new(), *n).with_field(Arc::clone(item)),
            ),
            t => {
                return Err(format!(
                    "column `{}`: {t} is not read from Protobuf",
                    f.name()
                ));
            }
        })
    }

    /// Appends one value (already converted to what the column holds).
    fn push(&mut self, v: Option<&Cell<'_>>) {
        match (self, v) {
            (Builder::Text(b), Some(Cell::Text(s))) => b.append_value(s.as_ref()),
            (Builder::Int64(b), Some(Cell::Int(i))) => b.append_value(*i),
            (Builder::Int32(b), Some(Cell::Int(i))) => b.append_value(*i as i32),
            (Builder::Int16(b), Some(Cell::Int(i))) => b.append_value(*i as i16),
            (Builder::Float64(b), Some(Cell::Float(x))) => b.append_value(*x),
            (Builder::Float32(b), Some(Cell::Float(x))) => b.append_value(*x as f32),
            (Builder::Bool(b), Some(Cell::Bool(x))) => b.append_value(*x),
            (Builder::Timestamp(b, _), Some(Cell::Int(i))) => b.append_value(*i),
            (Builder::Vector(b), Some(Cell::Vector(v))) => {
                b.values().append_slice(v);
                b.append(true);
            }
            (Builder::Text(b), _) => b.append_null(),
            (Builder::Int64(b), _) => b.append_null(),
            (Builder::Int32(b), _) => b.append_null(),
            (Builder::Int16(b), _) => b.append_null(),
            (Builder::Float64(b), _) => b.append_null(),
            (Builder::Float32(b), _) => b.append_null(),
            (Builder::Bool(b), _) => b.append_null(),
            (Builder::Timestamp(b, _), _) => b.append_null(),
            (Builder::Vector(b), _) => {
                let n = usize::try_from(b.value_length()).unwrap_or(0);
                b.values().append_slice(&vec![0.0; n]);
                b.append(false);
            }
        }
    }

    fn finish(&mut self) -> ArrayRef {
        match self {
            Builder::Text(b) => Arc::new(b.finish()),
            Builder::Int64(b) => Arc::new(b.finish()),
            Builder::Int32(b) => Arc::new(b.finish()),
            Builder::Int16(b) => Arc::new(b.finish()),
            Builder::Float64(b) => Arc::new(b.finish()),
            Builder::Float32(b) => Arc::new(b.finish()),
            Builder::Bool(b) => Arc::new(b.finish()),
            Builder::Timestamp(b, t) => Arc::new(b.finish().with_data_type(t.clone())),
            Builder::Vector(b) => Arc::new(b.finish()),
        }
    }

    fn len(&self) -> usize {
        match self {
            Builder::Text(b) => b.len(),
            Builder::Int64(b) => b.len(),
            Builder::Int32(b) => b.len(),
            Builder::Int16(b) => b.len(),
            Builder::Float64(b) => b.len(),
            Builder::Float32(b) => b.len(),
            Builder::Bool(b) => b.len(),
            Builder::Timestamp(b, _) => b.len(),
            Builder::Vector(b) => b.len(),
        }
    }
}

/// One value of a record, converted for its column (text borrowed from
/// the record where it can be).
#[derive(Debug, Clone, PartialEq)]
enum Cell<'a> {
    Text(std::borrow::Cow<'a, str>),
    Int(i64),
    Float(f64),
    Bool(bool),
    Vector(Vec<f32>),
}

/// Why a record does not fill its row.
type Bad = (DeadLetterKind, String);

/// Protobuf's wire types.
const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const GROUP_START: u8 = 3;
const GROUP_END: u8 = 4;
const FIXED32: u8 = 5;

/// Reads a varint at `*at`.
fn varint(b: &[u8], at: &mut usize) -> std::result::Result<u64, String> {
    let mut v: u64 = 0;
    for shift in (0..70).step_by(7) {
        let Some(&byte) = b.get(*at) else {
            return Err("a varint runs past the end".into());
        };
        *at += 1;
        if shift == 63 && byte > 1 {
            return Err("a varint is longer than 64 bits".into());
        }
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("a varint is longer than 10 bytes".into())
}

/// The bytes of `n` at `*at`, moving past them.
fn take<'a>(b: &'a [u8], at: &mut usize, n: usize) -> std::result::Result<&'a [u8], String> {
    let end = at
        .checked_add(n)
        .filter(|e| *e <= b.len())
        .ok_or_else(|| "a field runs past the end".to_string())?;
    let out = &b[*at..end];
    *at = end;
    Ok(out)
}

/// One field of a message on the wire: (number, wire type, value bytes).
/// A varint's bytes are the varint; a length-delimited value's are its
/// payload; a group's are everything up to its end tag.
fn next_field<'a>(b: &'a [u8], at: &mut usize) -> std::result::Result<(u32, u8, &'a [u8]), String> {
    let tag = varint(b, at)?;
    let number = u32::try_from(tag >> 3)
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("field number {} is not valid", tag >> 3))?;
    let wire = (tag & 7) as u8;
    let start = *at;
    let value = match wire {
        VARINT => {
            varint(b, at)?;
            &b[start..*at]
        }
        FIXED64 => take(b, at, 8)?,
        FIXED32 => take(b, at, 4)?,
        LEN => {
            let n = usize::try_from(varint(b, at)?).map_err(|_| "a length overflows")?;
            take(b, at, n)?
        }
        GROUP_START => {
            let mut depth = 1usize;
            loop {
                let t = varint(b, at)?;
                match (t & 7) as u8 {
                    VARINT => {
                        varint(b, at)?;
                    }
                    FIXED64 => {
                        take(b, at, 8)?;
                    }
                    FIXED32 => {
                        take(b, at, 4)?;
                    }
                    LEN => {
                        let n =
                            usize::try_from(varint(b, at)?).map_err(|_| "a length overflows")?;
                        take(b, at, n)?;
                    }
                    GROUP_START => depth += 1,
                    GROUP_END => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    w => return Err(format!("wire type {w} is not valid")),
                }
            }
            &b[start..*at]
        }
        GROUP_END => return Err(format!("field {number} ends a group that never started")),
        w => {
            return Err(format!(
                "field {number} has wire type {w}, which is not valid"
            ));
        }
    };
    Ok((number, wire, value))
}

/// The wire type a field of `kind` is written with (unpacked).
fn wire_of(kind: &Kind) -> u8 {
    match kind {
        Kind::Double | Kind::Fixed64 | Kind::Sfixed64 => FIXED64,
        Kind::Float | Kind::Fixed32 | Kind::Sfixed32 => FIXED32,
        Kind::String | Kind::Bytes | Kind::Message(_) => LEN,
        _ => VARINT,
    }
}

/// A scalar of `kind` from its value bytes (wire type already checked).
fn scalar<'a>(kind: &Kind, v: &'a [u8]) -> std::result::Result<Scalar<'a>, String> {
    let fixed = |n: usize| -> [u8; 8] {
        let mut out = [0u8; 8];
        out[..n].copy_from_slice(&v[..n]);
        out
    };
    let var = || varint(v, &mut 0);
    Ok(match kind {
        Kind::Int32 => Scalar::Int(i128::from(var()? as i32)),
        Kind::Int64 => Scalar::Int(i128::from(var()? as i64)),
        Kind::Uint32 => Scalar::Int(i128::from(var()? as u32)),
        Kind::Uint64 => Scalar::Int(i128::from(var()?)),
        Kind::Sint32 => {
            let z = var()? as u32;
            Scalar::Int(i128::from((z >> 1) as i32 ^ -((z & 1) as i32)))
        }
        Kind::Sint64 => Scalar::Int(i128::from(unzigzag(var()?))),
        Kind::Fixed32 => Scalar::Int(i128::from(u32::from_le_bytes([v[0], v[1], v[2], v[3]]))),
        Kind::Sfixed32 => Scalar::Int(i128::from(i32::from_le_bytes([v[0], v[1], v[2], v[3]]))),
        Kind::Fixed64 => Scalar::Int(i128::from(u64::from_le_bytes(fixed(8)))),
        Kind::Sfixed64 => Scalar::Int(i128::from(i64::from_le_bytes(fixed(8)))),
        Kind::Bool => Scalar::Bool(var()? != 0),
        Kind::Enum(_) => Scalar::Enum(var()? as i32),
        Kind::Double => Scalar::Float(f64::from_le_bytes(fixed(8))),
        Kind::Float => Scalar::Float(f64::from(f32::from_le_bytes([v[0], v[1], v[2], v[3]]))),
        Kind::String => {
            Scalar::Str(std::str::from_utf8(v).map_err(|_| "text that is not UTF-8".to_string())?)
        }
        Kind::Bytes | Kind::Message(_) => return Err("a value that is not a scalar".into()),
    })
}

/// A scalar as read off the wire.
#[derive(Debug, Clone, Copy)]
enum Scalar<'a> {
    Int(i128),
    Float(f64),
    Bool(bool),
    Str(&'a str),
    Enum(i32),
}

impl Scalar<'_> {
    /// The value of a field of `kind` that is not on the wire.
    fn default_of(kind: &Kind) -> Self {
        match kind {
            Kind::Double | Kind::Float => Scalar::Float(0.0),
            Kind::Bool => Scalar::Bool(false),
            Kind::String => Scalar::Str(""),
            Kind::Enum(e) => Scalar::Enum(e.default_value().number()),
            _ => Scalar::Int(0),
        }
    }

    fn show(&self) -> String {
        match self {
            Scalar::Int(i) => i.to_string(),
            Scalar::Float(x) => x.to_string(),
            Scalar::Bool(b) => b.to_string(),
            Scalar::Str(s) => format!("{s:?}"),
            Scalar::Enum(n) => format!("enum value {n}"),
        }
    }
}

/// What a field number of the message means to the decoder.
#[derive(Debug, Clone, Copy, Default)]
struct FieldSlot {
    /// The declared column it fills.
    column: Option<usize>,
    /// Its oneof (`optional`'s one-member oneofs left out).
    oneof: Option<usize>,
}

/// The message's field numbers: a table for the usual small numbers, a
/// map for the rest.
struct FieldMap {
    small: Vec<FieldSlot>,
    large: HashMap<u32, FieldSlot>,
}

impl FieldMap {
    const SMALL: u32 = 4096;

    fn new(message: &MessageDescriptor, columns: &[Column]) -> Self {
        let mut m = FieldMap {
            small: Vec::new(),
            large: HashMap::new(),
        };
        for (i, o) in message.oneofs().filter(|o| !o.is_synthetic()).enumerate() {
            for f in o.fields() {
                m.slot(f.number()).oneof = Some(i);
            }
        }
        for (i, c) in columns.iter().enumerate() {
            m.slot(c.field.number()).column = Some(i);
        }
        m
    }

    fn slot(&mut self, n: u32) -> &mut FieldSlot {
        if n < Self::SMALL {
            let n = n as usize;
            if self.small.len() <= n {
                self.small.resize(n + 1, FieldSlot::default());
            }
            &mut self.small[n]
        } else {
            self.large.entry(n).or_default()
        }
    }

    fn get(&self, n: u32) -> FieldSlot {
        if n < Self::SMALL {
            self.small.get(n as usize).copied().unwrap_or_default()
        } else {
            self.large.get(&n).copied().unwrap_or_default()
        }
    }
}

impl Column {
    /// Why a value of this column's field cannot be read with `wire`.
    fn wrong_wire(&self, wire: u8) -> String {
        format!(
            "a {} arrives with wire type {wire}",
            proto_type(&self.field)
        )
    }

    /// The scalar inside a wrapper message's bytes (occurrences merged).
    fn wrapped_scalar<'a>(
        &self,
        kind: &Kind,
        parts: impl Iterator<Item = &'a [u8]>,
    ) -> std::result::Result<Scalar<'a>, String> {
        let mut out = Scalar::default_of(kind);
        for part in parts {
            let mut at = 0;
            while at < part.len() {
                let (n, wire, v) = next_field(part, &mut at)?;
                if n == 1 {
                    if wire != wire_of(kind) {
                        return Err(self.wrong_wire(wire));
                    }
                    out = scalar(kind, v)?;
                }
            }
        }
        Ok(out)
    }

    /// Milliseconds of a `google.protobuf.Timestamp` (occurrences merged).
    fn timestamp<'a>(
        &self,
        parts: impl Iterator<Item = &'a [u8]>,
    ) -> std::result::Result<Option<i64>, String> {
        let (mut secs, mut nanos) = (0i64, 0i64);
        for part in parts {
            let mut at = 0;
            while at < part.len() {
                let (n, wire, v) = next_field(part, &mut at)?;
                match (n, wire) {
                    (1, VARINT) => secs = varint(v, &mut 0)? as i64,
                    (2, VARINT) => nanos = i64::from(varint(v, &mut 0)? as i32),
                    (1 | 2, w) => return Err(self.wrong_wire(w)),
                    _ => {}
                }
            }
        }
        Ok(secs
            .checked_mul(1000)
            .and_then(|ms| ms.checked_add(nanos.div_euclid(1_000_000))))
    }

    /// This column's cell from its field's occurrences in one record
    /// (`spans`: their wire types and value bytes in `body`, in order).
    fn cell<'a>(
        &self,
        body: &'a [u8],
        spans: &[(u8, usize, usize)],
    ) -> std::result::Result<Option<Cell<'a>>, Bad> {
        let parts = spans.iter().map(|(w, s, e)| (*w, &body[*s..*e]));
        let values = || spans.iter().map(|(_, s, e)| &body[*s..*e]);
        let name = self.field.name();
        let malformed = |reason: String| {
            (
                DeadLetterKind::MalformedRecord,
                format!("field {} (`{name}`): {reason}", self.field.number()),
            )
        };
        let wrong = |what: String| {
            (
                DeadLetterKind::WrongType,
                format!("column `{name}`: {what} does not fit {}", self.sql),
            )
        };
        let kind = &self.kind;
        let cell = if let Conv::Vector(n) = self.conv {
            // Repeated floats, packed or not; occurrences concatenate.
            let width = if matches!(kind, Kind::Double) { 8 } else { 4 };
            let one = wire_of(kind);
            let mut out = Vec::with_capacity(n);
            for (wire, v) in parts {
                if wire != LEN && wire != one {
                    return Err(malformed(self.wrong_wire(wire)));
                }
                if v.len() % width != 0 {
                    return Err(malformed(format!("{} bytes of packed values", v.len())));
                }
                for x in v.chunks_exact(width) {
                    let x = match scalar(kind, x).map_err(&malformed)? {
                        Scalar::Float(x) => x,
                        _ => 0.0,
                    };
                    // A double past f32's range is as infinite as inf.
                    if !(x as f32).is_finite() {
                        return Err(wrong(format!("vector value {x}")));
                    }
                    out.push(x as f32);
                }
            }
            match out.len() {
                // proto3 cannot tell an empty repeated field from a missing one.
                0 => None,
                len if len != n => return Err(wrong(format!("a vector of {len} values"))),
                _ => Some(Cell::Vector(out)),
            }
        } else if self.conv == Conv::Timestamp {
            if let Some((w, _, _)) = spans.iter().find(|(w, _, _)| *w != LEN) {
                return Err(malformed(self.wrong_wire(*w)));
            }
            if spans.is_empty() {
                None
            } else {
                match self.timestamp(values()).map_err(&malformed)? {
                    Some(ms) => Some(Cell::Int(ms)),
                    None => return Err(wrong("a timestamp out of range".into())),
                }
            }
        } else {
            let value = if self.wrapped {
                let Some(inner) = &self.inner else {
                    return Err(malformed("a wrapper without a value kind".into()));
                };
                if let Some((w, _, _)) = spans.iter().find(|(w, _, _)| *w != LEN) {
                    return Err(malformed(self.wrong_wire(*w)));
                }
                if spans.is_empty() {
                    None
                } else {
                    Some((
                        self.wrapped_scalar(inner, values()).map_err(&malformed)?,
                        inner,
                    ))
                }
            } else {
                match spans.last() {
                    // The last occurrence of a scalar wins.
                    Some((wire, s, e)) if *wire == wire_of(kind) => {
                        Some((scalar(kind, &body[*s..*e]).map_err(&malformed)?, kind))
                    }
                    Some((wire, _, _)) => return Err(malformed(self.wrong_wire(*wire))),
                    None if self.presence => None,
                    None => Some((Scalar::default_of(kind), kind)),
                }
            };
            match (self.conv, value) {
                (_, None) => None,
                (Conv::Text, Some((Scalar::Str(s), _))) => Some(Cell::Text(s.into())),
                (Conv::EnumName, Some((Scalar::Enum(n), k))) => {
                    let text = match k {
                        Kind::Enum(e) => e
                            .get_value(n)
                            .map(|v| v.name().to_string())
                            .unwrap_or_else(|| n.to_string()),
                        _ => n.to_string(),
                    };
                    Some(Cell::Text(text.into()))
                }
                (Conv::Int { min, max }, Some((Scalar::Int(i), _))) => match i64::try_from(i) {
                    Ok(i) if (min..=max).contains(&i) => Some(Cell::Int(i)),
                    _ => return Err(wrong(i.to_string())),
                },
                (Conv::Float64 | Conv::Float32, Some((Scalar::Float(x), _))) => {
                    Some(Cell::Float(x))
                }
                (Conv::Float64, Some((Scalar::Int(i), _))) => Some(Cell::Float(i as f64)),
                (Conv::Bool, Some((Scalar::Bool(b), _))) => Some(Cell::Bool(b)),
                (_, Some((v, _))) => return Err(wrong(v.show())),
            }
        };
        if cell.is_none() && !self.nullable {
            return Err((
                DeadLetterKind::MissingField,
                format!("column `{name}` is NOT NULL but the value is missing"),
            ));
        }
        Ok(cell)
    }
}

/// Reads Confluent's zig-zag varint from `b` at `*at`.
fn zigzag(b: &[u8], at: &mut usize) -> Option<i64> {
    varint(b, at).ok().map(unzigzag)
}

/// A zig-zag encoded value (`sint64`, Confluent's indexes) as signed.
fn unzigzag(z: u64) -> i64 {
    (z >> 1) as i64 ^ -((z & 1) as i64)
}

/// Decodes a source's Protobuf records into batches of its payload columns.
pub(crate) struct ProtobufRecords {
    source: String,
    payload: SchemaRef,
    framing: Framing,
    loaded: Loaded,
    builders: Vec<Builder>,
    fields: FieldMap,
    /// Per column: its field's occurrences in the record being read.
    parts: Vec<Vec<(u8, usize, usize)>>,
    /// Per oneof: the member last seen in the record being read.
    oneof_last: Vec<Option<u32>>,
    /// The last schema id and message indexes that named the message.
    framed_ok: Option<(u32, Vec<i64>)>,
    /// The message indexes of the record being read.
    indexes: Vec<i64>,
}

impl ProtobufRecords {
    /// A decoder for a source's payload columns.
    pub(crate) fn new(source: &str, payload: SchemaRef, o: &ProtobufOptions) -> Result<Self> {
        let err = |m: String| EngineError::Connector {
            what: format!("source {source}"),
            message: m,
        };
        let loaded = load_checked(o, &payload).map_err(|(_, m)| err(m))?;
        let builders = payload
            .fields()
            .iter()
            .map(Builder::new)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(err)?;
        let fields = FieldMap::new(&loaded.message, &loaded.columns);
        let oneofs = loaded
            .message
            .oneofs()
            .filter(|o| !o.is_synthetic())
            .count();
        Ok(ProtobufRecords {
            source: source.to_string(),
            framing: o.framing,
            fields,
            parts: vec![Vec::new(); loaded.columns.len()],
            oneof_last: vec![None; oneofs],
            framed_ok: None,
            indexes: Vec::new(),
            payload,
            loaded,
            builders,
        })
    }

    /// The Protobuf body of a record, or why not.
    fn frame<'a>(&mut self, record: &'a [u8]) -> std::result::Result<&'a [u8], String> {
        if self.framing == Framing::None {
            return Ok(record);
        }
        if record.len() < 6 || record[0] != 0 {
            return Err(
                "not in Confluent framing (a zero byte, a 4-byte schema id, the message indexes)"
                    .into(),
            );
        }
        let id = u32::from_be_bytes([record[1], record[2], record[3], record[4]]);
        let mut at = 5;
        let bad_indexes = || "the message indexes after the schema id do not decode".to_string();
        let n = zigzag(record, &mut at).ok_or_else(bad_indexes)?;
        let mut indexes = std::mem::take(&mut self.indexes);
        indexes.clear();
        if n == 0 {
            indexes.push(0);
        } else {
            if !(1..=64).contains(&n) {
                return Err(bad_indexes());
            }
            for _ in 0..n {
                indexes.push(zigzag(record, &mut at).ok_or_else(bad_indexes)?);
            }
        }
        let known = self
            .framed_ok
            .as_ref()
            .is_some_and(|(i, ix)| *i == id && *ix == indexes);
        let checked = if known {
            Ok(())
        } else {
            self.check_frame(id, &indexes)
        };
        if checked.is_ok() && !known {
            self.framed_ok = Some((id, indexes.clone()));
        }
        self.indexes = indexes;
        checked.map(|()| &record[at..])
    }

    /// Whether schema `id` is read and its message `indexes` name the
    /// reader message.
    fn check_frame(&self, id: u32, indexes: &[i64]) -> std::result::Result<(), String> {
        let file = if self.loaded.writers.is_empty() {
            &self.loaded.reader
        } else {
            match self.loaded.writers.get(&id) {
                Some(w) => w,
                None => {
                    let ids: Vec<String> = self.loaded.writers.keys().map(u32::to_string).collect();
                    return Err(format!(
                        "schema id {id} has no writer schema (the source maps ids {})",
                        ids.join(", ")
                    ));
                }
            }
        };
        let want = self.loaded.message.full_name();
        match file.by_indexes(indexes) {
            Some(m) if m.full_name() == want => Ok(()),
            Some(m) => Err(format!(
                "schema id {id} message indexes {indexes:?} name {} in {}, not {want}",
                m.full_name(),
                file.label
            )),
            None => Err(format!(
                "schema id {id} message indexes {indexes:?} name no message of {}",
                file.label
            )),
        }
    }

    /// One record's cells, or why it is rejected: the body is read field
    /// by field, straight from the wire, and only the declared columns'
    /// fields are kept.
    fn row<'a>(&mut self, record: &'a [u8]) -> std::result::Result<Vec<Option<Cell<'a>>>, Bad> {
        let body = self
            .frame(record)
            .map_err(|r| (DeadLetterKind::MalformedRecord, r))?;
        let malformed = |e: String| {
            (
                DeadLetterKind::MalformedRecord,
                format!(
                    "does not decode as {} ({}): {e}",
                    self.loaded.message.full_name(),
                    self.loaded.reader.label
                ),
            )
        };
        for p in &mut self.parts {
            p.clear();
        }
        self.oneof_last.fill(None);
        let mut at = 0;
        while at < body.len() {
            let (n, wire, v) = next_field(body, &mut at).map_err(&malformed)?;
            let slot = self.fields.get(n);
            if let Some(o) = slot.oneof {
                self.oneof_last[o] = Some(n);
            }
            if let Some(c) = slot.column {
                let off = v.as_ptr() as usize - body.as_ptr() as usize;
                self.parts[c].push((wire, off, off + v.len()));
            }
        }
        let mut cells = Vec::with_capacity(self.loaded.columns.len());
        for (c, spans) in self.loaded.columns.iter().zip(&self.parts) {
            let n = c.number;
            // A oneof member that another member came after is not set.
            let cleared = self
                .fields
                .get(n)
                .oneof
                .and_then(|o| self.oneof_last[o])
                .is_some_and(|last| last != n);
            cells.push(c.cell(body, if cleared { &[] } else { spans })?);
        }
        Ok(cells)
    }

    /// Decodes the records `spans` of `buf`. Returns the rows that decode
    /// and fit the columns, and for each row the index of its span; the
    /// others go to `rejected`.
    pub(crate) fn decode(
        &mut self,
        buf: &[u8],
        spans: &[Span],
        reject: Reject<'_>,
        rejected: &mut Vec<DeadLetter>,
    ) -> Result<Option<(RecordBatch, Vec<usize>)>> {
        let mut rows = Vec::with_capacity(spans.len());
        for (i, sp) in spans.iter().enumerate() {
            let record = &buf[sp.start..sp.end];
            match self.row(record) {
                Ok(cells) => {
                    for (b, c) in self.builders.iter_mut().zip(&cells) {
                        b.push(c.as_ref());
                    }
                    rows.push(i);
                }
                Err((kind, reason)) => rejected.push(reject(sp.pos, record, kind, reason)),
            }
        }
        if rows.is_empty() {
            return Ok(None);
        }
        let cols: Vec<ArrayRef> = self.builders.iter_mut().map(Builder::finish).collect();
        debug_assert!(self.builders.iter().all(|b| b.len() == 0));
        let batch = RecordBatch::try_new(Arc::clone(&self.payload), cols)
            .map_err(|e| EngineError::arrow(format!("source {}", self.source), e))?;
        Ok(Some((batch, rows)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json::{spans_of, test_reject};
    use arrow::array::{Array, AsArray, Float64Array, StringArray};
    use arrow::datatypes::{Field, Float32Type, TimeUnit};
    use prost::Message as _;
    use prost_reflect::{DynamicMessage, Value};

    const PROTO: &str = r#"
syntax = "proto3";
package sluice.test;
import "google/protobuf/timestamp.proto";
import "google/protobuf/wrappers.proto";

message Other { string x = 1; }

message Click {
  enum Device { DEVICE_UNKNOWN = 0; PHONE = 1; DESKTOP = 2; }
  string user_id = 1;
  google.protobuf.StringValue item_id = 2;
  optional double price = 3;
  google.protobuf.Timestamp ts = 4;
  Device device = 5;
  int64 n = 6;
  repeated float embedding = 7;
  message Nested { int32 y = 1; }
}
"#;

    fn payload() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("user_id", DataType::Utf8, false),
            Field::new("item_id", DataType::Utf8, true),
            Field::new("price", DataType::Float64, true),
            Field::new(
                "ts",
                DataType::Timestamp(TimeUnit::Millisecond, None),
                false,
            ),
            Field::new("device", DataType::Utf8, true),
            Field::new("n", DataType::Int32, true),
            Field::new("embedding", sluice_sql::vector_type(2), true),
        ]))
    }

    fn options(dir: &Path, framing: Framing) -> ProtobufOptions {
        let p = dir.join("click.proto");
        std::fs::write(&p, PROTO).expect("schema");
        ProtobufOptions {
            schema: p,
            message: "Click".into(),
            framing,
            writers: BTreeMap::new(),
        }
    }

    /// A record encoded by prost-reflect's encoder from the same file.
    fn record(o: &ProtobufOptions, set: &[(&str, Value)]) -> Vec<u8> {
        let f = ProtoFile::compile(&o.schema).expect("compile");
        let m = f.message("sluice.test.Click").expect("message");
        let mut msg = DynamicMessage::new(m);
        for (k, v) in set {
            msg.set_field_by_name(k, v.clone());
        }
        msg.encode_to_vec()
    }

    fn timestamp(o: &ProtobufOptions, ms: i64) -> Value {
        let f = ProtoFile::compile(&o.schema).expect("compile");
        let d = f
            .pool
            .get_message_by_name("google.protobuf.Timestamp")
            .expect("Timestamp");
        let mut m = DynamicMessage::new(d);
        m.set_field_by_number(1, Value::I64(ms.div_euclid(1000)));
        m.set_field_by_number(2, Value::I32((ms.rem_euclid(1000) * 1_000_000) as i32));
        Value::Message(m)
    }

    fn framed(id: u32, indexes: &[u8], body: Vec<u8>) -> Vec<u8> {
        let mut v = vec![0];
        v.extend_from_slice(&id.to_be_bytes());
        v.extend_from_slice(indexes);
        v.extend(body);
        v
    }

    #[test]
    fn values_fill_their_columns_and_frames_are_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let o = options(dir.path(), Framing::Confluent);
        let mut p = ProtobufRecords::new("s", payload(), &o).expect("records");
        let f = ProtoFile::compile(&o.schema).expect("compile");
        let sv = f
            .pool
            .get_message_by_name("google.protobuf.StringValue")
            .expect("StringValue");
        let mut item = DynamicMessage::new(sv.clone());
        item.set_field_by_number(1, Value::String("i9".into()));
        let full = record(
            &o,
            &[
                ("user_id", Value::String("u1".into())),
                ("item_id", Value::Message(item)),
                ("price", Value::F64(2.5)),
                ("ts", timestamp(&o, 1_704_067_200_123)),
                ("device", Value::EnumNumber(2)),
                ("n", Value::I64(7)),
                (
                    "embedding",
                    Value::List(vec![Value::F32(0.5), Value::F32(-1.0)]),
                ),
            ],
        );
        // Only what is required: price, item and the vector NULL, n and
        // device their defaults; an empty wrapper is its default, not NULL.
        let sparse = record(
            &o,
            &[
                ("user_id", Value::String("u2".into())),
                ("item_id", Value::Message(DynamicMessage::new(sv))),
                ("ts", timestamp(&o, -1)),
            ],
        );
        // Confluent's message indexes, zig-zag: [2, 2] is the list [1]
        // (`Click`, the second top-level message); a lone 0 is [0] (`Other`).
        let mut cut = framed(7, &[2, 2], full.clone());
        cut.truncate(cut.len() - 4);
        let records = vec![
            framed(7, &[2, 2], full),
            framed(7, &[2, 2], sparse),
            framed(7, &[0], record(&o, &[])),
            framed(7, &[2, 20], record(&o, &[])),
            cut,
            b"{\"user_id\":\"u\"}".to_vec(),
        ];
        let (buf, spans) = spans_of(&records);
        let mut rejected = Vec::new();
        let (b, rows) = p
            .decode(&buf, &spans, &test_reject, &mut rejected)
            .expect("decode")
            .expect("rows");
        assert_eq!(rows, vec![0, 1], "{rejected:#?}");
        let reasons: Vec<(&str, DeadLetterKind, &str)> = rejected
            .iter()
            .map(|d| (d.position.as_str(), d.kind, d.reason.as_str()))
            .collect();
        assert_eq!(reasons.len(), 4, "{reasons:#?}");
        assert!(
            reasons
                .iter()
                .all(|r| r.1 == DeadLetterKind::MalformedRecord)
        );
        assert!(
            reasons[0].2.contains("name sluice.test.Other in"),
            "{reasons:?}"
        );
        assert!(reasons[1].2.contains("name no message"), "{reasons:?}");
        assert!(
            reasons[2]
                .2
                .contains("does not decode as sluice.test.Click"),
            "{reasons:?}"
        );
        assert!(reasons[3].2.contains("Confluent framing"), "{reasons:?}");

        let users: &StringArray = b.column(0).as_string();
        assert_eq!((users.value(0), users.value(1)), ("u1", "u2"));
        let items: &StringArray = b.column(1).as_string();
        assert_eq!((items.value(0), items.value(1)), ("i9", ""));
        let price = b
            .column(2)
            .as_any()
            .downcast_ref::<Float64Array>()
            .expect("price");
        assert_eq!(price.value(0), 2.5);
        assert!(price.is_null(1));
        let ts = b
            .column(3)
            .as_primitive::<arrow::datatypes::TimestampMillisecondType>();
        assert_eq!((ts.value(0), ts.value(1)), (1_704_067_200_123, -1));
        let device: &StringArray = b.column(4).as_string();
        assert_eq!(
            (device.value(0), device.value(1)),
            ("DESKTOP", "DEVICE_UNKNOWN")
        );
        let n = b.column(5).as_primitive::<arrow::datatypes::Int32Type>();
        assert_eq!((n.value(0), n.value(1)), (7, 0));
        let e = b.column(6).as_fixed_size_list();
        assert_eq!(
            e.value(0).as_primitive::<Float32Type>().values().to_vec(),
            vec![0.5, -1.0]
        );
        assert!(e.is_null(1));

        // The next poll decodes on, with fresh builders.
        let again = record(
            &o,
            &[
                ("user_id", Value::String("u3".into())),
                ("ts", timestamp(&o, 9)),
            ],
        );
        let (buf, spans) = spans_of(&[framed(7, &[2, 2], again)]);
        let (b, _) = p
            .decode(&buf, &spans, &test_reject, &mut rejected)
            .expect("decode")
            .expect("rows");
        assert_eq!(b.num_rows(), 1);
    }

    #[test]
    fn type_and_null_rules_name_the_column() {
        let dir = tempfile::tempdir().expect("tempdir");
        let o = options(dir.path(), Framing::None);
        let mut p = ProtobufRecords::new("s", payload(), &o).expect("records");
        let no_ts = record(&o, &[("user_id", Value::String("u3".into()))]);
        let too_big = record(
            &o,
            &[
                ("user_id", Value::String("u4".into())),
                ("ts", timestamp(&o, 5)),
                ("n", Value::I64(1 << 40)),
            ],
        );
        let short_vector = record(
            &o,
            &[
                ("user_id", Value::String("u5".into())),
                ("ts", timestamp(&o, 5)),
                ("embedding", Value::List(vec![Value::F32(1.0)])),
            ],
        );
        let good = record(
            &o,
            &[
                ("user_id", Value::String("u6".into())),
                ("ts", timestamp(&o, 6)),
            ],
        );
        // Field 3 (`price`, a double) written as a varint.
        let mut wire_mismatch = good.clone();
        wire_mismatch.extend_from_slice(&[3 << 3, 1]);
        let (buf, spans) = spans_of(&[
            no_ts,
            too_big,
            short_vector,
            vec![0xff, 0xff],
            good,
            wire_mismatch,
        ]);
        let mut rejected = Vec::new();
        let (b, rows) = p
            .decode(&buf, &spans, &test_reject, &mut rejected)
            .expect("decode")
            .expect("rows");
        assert_eq!((rows, b.num_rows()), (vec![4], 1));
        let reasons: Vec<(DeadLetterKind, &str)> = rejected
            .iter()
            .map(|d| (d.kind, d.reason.as_str()))
            .collect();
        assert_eq!(reasons.len(), 5, "{reasons:#?}");
        assert_eq!(reasons[4].0, DeadLetterKind::MalformedRecord);
        assert!(
            reasons[4]
                .1
                .ends_with("field 3 (`price`): a double arrives with wire type 0"),
            "{reasons:?}"
        );
        assert_eq!(reasons[0].0, DeadLetterKind::MissingField);
        assert!(
            reasons[0].1.contains("column `ts` is NOT NULL"),
            "{reasons:?}"
        );
        assert_eq!(reasons[1].0, DeadLetterKind::WrongType);
        assert!(
            reasons[1].1.contains("column `n`") && reasons[1].1.contains("does not fit INT"),
            "{reasons:?}"
        );
        assert_eq!(reasons[2].0, DeadLetterKind::WrongType);
        assert!(reasons[2].1.contains("a vector of 1 values"), "{reasons:?}");
        assert_eq!(reasons[3].0, DeadLetterKind::MalformedRecord);
        assert!(
            reasons[3]
                .1
                .contains("does not decode as sluice.test.Click"),
            "{reasons:?}"
        );
    }

    #[test]
    fn schema_mistakes_name_the_option() {
        let dir = tempfile::tempdir().expect("tempdir");
        let o = options(dir.path(), Framing::None);
        let e = |o: &ProtobufOptions, s: SchemaRef| check(o, &s).expect_err("refused");
        let wrong = Arc::new(Schema::new(vec![Field::new(
            "user_id",
            DataType::Int64,
            false,
        )]));
        let (k, m) = e(&o, wrong);
        assert_eq!(k, "schema");
        assert!(
            m.contains("column `user_id` is BIGINT in the pipeline but string"),
            "{m}"
        );
        let missing = Arc::new(Schema::new(vec![Field::new("page", DataType::Utf8, true)]));
        let (_, m) = e(&o, missing);
        assert!(
            m.contains("not a field of message sluice.test.Click"),
            "{m}"
        );
        let ts = Arc::new(Schema::new(vec![Field::new("n", TIMESTAMP, true)]));
        let (_, m) = e(&o, ts);
        assert!(m.contains("google.protobuf.Timestamp"), "{m}");
        let mut named = o.clone();
        named.message = "Nope".into();
        let (k, m) = e(&named, payload());
        assert_eq!(k, "message");
        assert!(
            m.contains("sluice.test.Click, sluice.test.Click.Nested"),
            "{m}"
        );
        let bad = dir.path().join("bad.proto");
        std::fs::write(
            &bad,
            "syntax = \"proto3\";\nmessage Click {\n  string user_id = 1\n}\n",
        )
        .expect("write");
        let mut broken = o.clone();
        broken.schema = bad;
        let (_, m) = e(&broken, payload());
        assert!(m.contains("bad.proto:4:1"), "{m}");
        // A writer whose field 3 changed type.
        let w = dir.path().join("w.proto");
        std::fs::write(
            &w,
            "syntax = \"proto3\"; package sluice.test; message Click { string user_id = 1; string price = 3; }",
        )
        .expect("write");
        let mut writer = options(dir.path(), Framing::Confluent);
        writer.writers.insert(4, w);
        let (k, m) = e(&writer, payload());
        assert_eq!(k, "schema.4");
        assert!(m.contains("field 3 is `price` string"), "{m}");
        assert!(check(&o, &payload()).is_ok());
    }

    const TIMESTAMP: DataType = DataType::Timestamp(TimeUnit::Millisecond, None);

    /// Protobuf's merge rules on concatenated messages: the last member of
    /// a oneof wins, the last scalar wins, repeated fields concatenate,
    /// messages merge field by field.
    #[test]
    fn concatenated_messages_merge_as_protobuf_says() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("m.proto");
        std::fs::write(
            &p,
            r#"syntax = "proto3";
import "google/protobuf/timestamp.proto";
message M {
  oneof choice { string a = 1; int64 b = 2; }
  int64 c = 3;
  repeated float v = 4;
  google.protobuf.Timestamp t = 5;
}"#,
        )
        .expect("write");
        let o = ProtobufOptions {
            schema: p,
            message: "M".into(),
            framing: Framing::None,
            writers: BTreeMap::new(),
        };
        let schema = Arc::new(Schema::new(vec![
            Field::new("a", DataType::Utf8, true),
            Field::new("b", DataType::Int64, true),
            Field::new("c", DataType::Int64, true),
            Field::new("v", sluice_sql::vector_type(3), true),
            Field::new("t", TIMESTAMP, true),
        ]));
        let f = ProtoFile::compile(&o.schema).expect("compile");
        let m = f.message("M").expect("M");
        let ts = f
            .pool
            .get_message_by_name("google.protobuf.Timestamp")
            .expect("Timestamp");
        let enc = |set: &[(&str, Value)]| {
            let mut msg = DynamicMessage::new(m.clone());
            for (k, v) in set {
                msg.set_field_by_name(k, v.clone());
            }
            msg.encode_to_vec()
        };
        let stamp = |secs: i64, nanos: i32| {
            let mut t = DynamicMessage::new(ts.clone());
            if secs != 0 {
                t.set_field_by_number(1, Value::I64(secs));
            }
            if nanos != 0 {
                t.set_field_by_number(2, Value::I32(nanos));
            }
            Value::Message(t)
        };
        let floats = |v: &[f32]| Value::List(v.iter().map(|x| Value::F32(*x)).collect());
        let first = [
            enc(&[
                ("a", Value::String("x".into())),
                ("c", Value::I64(1)),
                ("v", floats(&[1.0, 2.0])),
                ("t", stamp(1, 0)),
            ]),
            enc(&[
                ("b", Value::I64(5)),
                ("c", Value::I64(2)),
                ("v", floats(&[3.0])),
                ("t", stamp(0, 5_000_000)),
            ]),
        ]
        .concat();
        let second = [
            enc(&[("b", Value::I64(5))]),
            enc(&[("a", Value::String("y".into()))]),
        ]
        .concat();
        let mut d = ProtobufRecords::new("s", schema, &o).expect("records");
        let (buf, spans) = spans_of(&[first, second]);
        let mut rejected = Vec::new();
        let (b, _) = d
            .decode(&buf, &spans, &test_reject, &mut rejected)
            .expect("decode")
            .expect("rows");
        assert!(rejected.is_empty(), "{rejected:?}");
        let a = b.column(0).as_string::<i32>();
        let bb = b.column(1).as_primitive::<arrow::datatypes::Int64Type>();
        assert!(a.is_null(0) && bb.value(0) == 5);
        assert!(a.value(1) == "y" && bb.is_null(1));
        let c = b.column(2).as_primitive::<arrow::datatypes::Int64Type>();
        assert_eq!((c.value(0), c.value(1)), (2, 0));
        let v = b.column(3).as_fixed_size_list();
        assert_eq!(
            v.value(0).as_primitive::<Float32Type>().values().to_vec(),
            vec![1.0, 2.0, 3.0]
        );
        assert!(v.is_null(1));
        let t = b
            .column(4)
            .as_primitive::<arrow::datatypes::TimestampMillisecondType>();
        assert_eq!(t.value(0), 1005);
        assert!(t.is_null(1));
    }

    mod properties {
        //! The wire decoder against prost-reflect's encoder, on random
        //! values; and any bytes give a row or a dead letter, never a panic.

        use super::*;
        use proptest::prelude::*;

        type Input = (
            String,
            Option<String>,
            Option<f64>,
            i64,
            i32,
            i64,
            Option<(f32, f32)>,
        );

        fn input() -> impl Strategy<Value = Input> {
            (
                "[a-z0-9é]{0,12}",
                proptest::option::of("[a-z]{0,6}"),
                proptest::option::of(-1e12f64..1e12),
                -10_000_000_000_000i64..10_000_000_000_000,
                0i32..4,
                prop_oneof![-3_000_000_000i64..3_000_000_000, Just(i64::MIN)],
                proptest::option::of((-1e6f32..1e6, -1e6f32..1e6)),
            )
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(200))]

            #[test]
            fn decodes_what_prost_reflect_encodes(inputs in proptest::collection::vec(input(), 1..20)) {
                let dir = tempfile::tempdir().expect("tempdir");
                let o = options(dir.path(), Framing::None);
                let f = ProtoFile::compile(&o.schema).expect("compile");
                let sv = f.pool.get_message_by_name("google.protobuf.StringValue").expect("sv");
                let mut p = ProtobufRecords::new("s", payload(), &o).expect("records");
                let records: Vec<Vec<u8>> = inputs
                    .iter()
                    .map(|(user, item, price, ts, device, n, emb)| {
                        let mut set = vec![
                            ("user_id", Value::String(user.clone())),
                            ("ts", timestamp(&o, *ts)),
                            ("device", Value::EnumNumber(*device)),
                            ("n", Value::I64(*n)),
                        ];
                        if let Some(i) = item {
                            let mut w = DynamicMessage::new(sv.clone());
                            w.set_field_by_number(1, Value::String(i.clone()));
                            set.push(("item_id", Value::Message(w)));
                        }
                        if let Some(x) = price {
                            set.push(("price", Value::F64(*x)));
                        }
                        if let Some((a, b)) = emb {
                            set.push(("embedding", Value::List(vec![Value::F32(*a), Value::F32(*b)])));
                        }
                        let mut r = record(&o, &set);
                        // An unknown field (number 99, a varint) is skipped.
                        r.extend_from_slice(&[0x98, 0x06, 0x2a]);
                        r
                    })
                    .collect();
                let (buf, spans) = spans_of(&records);
                let mut rejected = Vec::new();
                let out = p.decode(&buf, &spans, &test_reject, &mut rejected).expect("decode");
                let fits = |n: i64| i32::try_from(n).is_ok();
                let want_rows: Vec<usize> =
                    (0..inputs.len()).filter(|i| fits(inputs[*i].5)).collect();
                prop_assert_eq!(rejected.len(), inputs.len() - want_rows.len());
                prop_assert!(rejected.iter().all(|d| d.kind == DeadLetterKind::WrongType));
                let Some((b, rows)) = out else {
                    prop_assert!(want_rows.is_empty());
                    return Ok(());
                };
                prop_assert_eq!(&rows, &want_rows);
                for (r, i) in rows.iter().enumerate() {
                    let (user, item, price, ts, device, n, emb) = &inputs[*i];
                    prop_assert_eq!(b.column(0).as_string::<i32>().value(r), user.as_str());
                    let items = b.column(1).as_string::<i32>();
                    prop_assert_eq!(items.is_valid(r).then(|| items.value(r).to_string()), item.clone());
                    let prices = b.column(2).as_primitive::<arrow::datatypes::Float64Type>();
                    prop_assert_eq!(prices.is_valid(r).then(|| prices.value(r)), *price);
                    let t = b.column(3).as_primitive::<arrow::datatypes::TimestampMillisecondType>();
                    prop_assert_eq!(t.value(r), *ts);
                    let names = ["DEVICE_UNKNOWN", "PHONE", "DESKTOP", "3"];
                    prop_assert_eq!(b.column(4).as_string::<i32>().value(r), names[*device as usize]);
                    let ns = b.column(5).as_primitive::<arrow::datatypes::Int32Type>();
                    prop_assert_eq!(i64::from(ns.value(r)), *n);
                    let e = b.column(6).as_fixed_size_list();
                    let got = e.is_valid(r).then(|| {
                        let v = e.value(r);
                        let v = v.as_primitive::<Float32Type>();
                        (v.value(0), v.value(1))
                    });
                    prop_assert_eq!(got, *emb);
                }
            }

            #[test]
            fn any_bytes_give_a_row_or_a_dead_letter(
                records in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 1..30),
                framing in prop_oneof![Just(Framing::None), Just(Framing::Confluent)],
            ) {
                let dir = tempfile::tempdir().expect("tempdir");
                let o = options(dir.path(), framing);
                let mut p = ProtobufRecords::new("s", payload(), &o).expect("records");
                let (buf, spans) = spans_of(&records);
                let mut rejected = Vec::new();
                let out = p.decode(&buf, &spans, &test_reject, &mut rejected).expect("decode");
                let rows = out.map_or(0, |(b, _)| b.num_rows());
                prop_assert_eq!(rows + rejected.len(), records.len());
            }
        }
    }
}
