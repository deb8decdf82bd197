//! An Avro writer schema as the shape of its binary encoding, to check a
//! record without decoding it: after a record that does not decode, the
//! decoder must be built anew (it may hold part of the record), so the
//! records after it are checked here first and only whole ones reach the
//! decoder. Checking reads each byte once and builds nothing.

use serde_json::Value;

/// A node of the shape; named types refer to nodes by index.
#[derive(Debug, Clone)]
enum Node {
    Null,
    Boolean,
    /// `int` (a zig-zag varint of 32 bits) and its logical types.
    Int,
    /// `long` (a zig-zag varint of 64 bits) and its logical types.
    Long,
    Float,
    Double,
    Bytes,
    String,
    Record(Vec<usize>),
    Enum(u64),
    Array(usize),
    Map(usize),
    Union(Vec<usize>),
    Fixed(usize),
}

/// The shape of a schema's encoding.
#[derive(Debug, Clone)]
pub(crate) struct Shape {
    nodes: Vec<Node>,
    root: usize,
}

/// Nesting (of records, unions, arrays and maps) a record may have
/// before it is refused: a recursive schema cannot exhaust the stack.
const MAX_DEPTH: usize = 1024;

struct Builder {
    nodes: Vec<Node>,
    named: Vec<(String, usize)>,
}

impl Builder {
    fn push(&mut self, n: Node) -> usize {
        self.nodes.push(n);
        self.nodes.len() - 1
    }

    /// A name made full by the enclosing namespace (Avro's rule: a name
    /// with a dot is full already).
    fn full_name(name: &str, ns: Option<&str>) -> String {
        match ns {
            Some(ns) if !name.contains('.') && !ns.is_empty() => format!("{ns}.{name}"),
            _ => name.to_string(),
        }
    }

    /// The namespace a full name gives the types defined inside it.
    fn namespace_of(full: &str) -> Option<&str> {
        full.rsplit_once('.').map(|(ns, _)| ns)
    }

    /// A named type referred to by `name` within namespace `ns`.
    fn lookup(&self, name: &str, ns: Option<&str>) -> Option<usize> {
        let full = Self::full_name(name, ns);
        self.named
            .iter()
            .find(|(n, _)| *n == full)
            .or_else(|| self.named.iter().find(|(n, _)| n == name))
            .map(|(_, i)| *i)
    }

    /// Registers a named type at `at`; returns its full name.
    fn define(
        &mut self,
        o: &serde_json::Map<String, Value>,
        ns: Option<&str>,
        at: usize,
    ) -> Option<String> {
        let full = Self::full_name(o.get("name")?.as_str()?, ns);
        self.named.push((full.clone(), at));
        Some(full)
    }

    fn build(&mut self, v: &Value, ns: Option<&str>) -> Option<usize> {
        match v {
            Value::String(t) => self.primitive(t).or_else(|| self.lookup(t, ns)),
            Value::Array(variants) => {
                let vs = variants
                    .iter()
                    .map(|x| self.build(x, ns))
                    .collect::<Option<Vec<_>>>()?;
                Some(self.push(Node::Union(vs)))
            }
            Value::Object(o) => {
                let t = o.get("type")?;
                let ty = t.as_str();
                let ns = o.get("namespace").and_then(Value::as_str).or(ns);
                match ty {
                    Some("record") | Some("error") => {
                        // Named first, so fields may refer to it.
                        let at = self.push(Node::Record(Vec::new()));
                        let full = self.define(o, ns, at)?;
                        let inner = Self::namespace_of(&full).map(str::to_string);
                        let fields = o.get("fields")?.as_array()?;
                        let mut fs = Vec::with_capacity(fields.len());
                        for f in fields {
                            fs.push(self.build(f.get("type")?, inner.as_deref())?);
                        }
                        self.nodes[at] = Node::Record(fs);
                        Some(at)
                    }
                    Some("enum") => {
                        let n = o.get("symbols")?.as_array()?.len() as u64;
                        let at = self.push(Node::Enum(n));
                        self.define(o, ns, at)?;
                        Some(at)
                    }
                    Some("fixed") => {
                        let size = o.get("size")?.as_u64()? as usize;
                        let at = self.push(Node::Fixed(size));
                        self.define(o, ns, at)?;
                        Some(at)
                    }
                    Some("array") => {
                        let items = self.build(o.get("items")?, ns)?;
                        Some(self.push(Node::Array(items)))
                    }
                    Some("map") => {
                        let values = self.build(o.get("values")?, ns)?;
                        Some(self.push(Node::Map(values)))
                    }
                    // A primitive with attributes (logical types), or a
                    // nested type definition.
                    _ => self.build(t, ns),
                }
            }
            _ => None,
        }
    }

    fn primitive(&mut self, t: &str) -> Option<usize> {
        let n = match t {
            "null" => Node::Null,
            "boolean" => Node::Boolean,
            "int" => Node::Int,
            "long" => Node::Long,
            "float" => Node::Float,
            "double" => Node::Double,
            "bytes" => Node::Bytes,
            "string" => Node::String,
            _ => return None,
        };
        Some(self.push(n))
    }
}

impl Shape {
    /// The shape of a schema's JSON text; `None` when it cannot be read
    /// (the decoder alone then judges records).
    pub(crate) fn of(json: &str) -> Option<Shape> {
        let v: Value = serde_json::from_str(json).ok()?;
        let mut b = Builder {
            nodes: Vec::new(),
            named: Vec::new(),
        };
        let root = b.build(&v, None)?;
        Some(Shape {
            nodes: b.nodes,
            root,
        })
    }

    /// Why `body` is not exactly one record of this shape, if it is not.
    pub(crate) fn check(&self, body: &[u8]) -> std::result::Result<(), String> {
        let mut at = 0usize;
        self.skip(self.root, body, &mut at, 0)?;
        if at != body.len() {
            return Err(format!(
                "{} bytes left over after the record's {at}",
                body.len() - at
            ));
        }
        Ok(())
    }

    fn skip(
        &self,
        n: usize,
        b: &[u8],
        at: &mut usize,
        depth: usize,
    ) -> std::result::Result<(), String> {
        if depth > MAX_DEPTH {
            return Err(format!("nested deeper than {MAX_DEPTH} levels"));
        }
        match &self.nodes[n] {
            Node::Null => Ok(()),
            Node::Boolean => match take(b, at, 1)?[0] {
                0 | 1 => Ok(()),
                x => Err(format!("a boolean byte of {x}")),
            },
            Node::Int => {
                let v = varint(b, at)?;
                i32::try_from(v)
                    .map(|_| ())
                    .map_err(|_| format!("an int of {v}, beyond 32 bits"))
            }
            Node::Long => varint(b, at).map(|_| ()),
            Node::Float => take(b, at, 4).map(|_| ()),
            Node::Double => take(b, at, 8).map(|_| ()),
            Node::Bytes => {
                let len = length(b, at)?;
                take(b, at, len).map(|_| ())
            }
            Node::String => self.skip_string(b, at),
            Node::Record(fields) => {
                for f in fields {
                    self.skip(*f, b, at, depth + 1)?;
                }
                Ok(())
            }
            Node::Enum(symbols) => {
                let i = varint(b, at)?;
                if i < 0 || i as u64 >= *symbols {
                    return Err(format!("enum index {i} of {symbols} symbols"));
                }
                Ok(())
            }
            Node::Fixed(size) => take(b, at, *size).map(|_| ()),
            Node::Array(items) => self.blocks(b, at, |s, b, at| s.skip(*items, b, at, depth + 1)),
            Node::Map(values) => self.blocks(b, at, |s, b, at| {
                s.skip_string(b, at)?;
                s.skip(*values, b, at, depth + 1)
            }),
            Node::Union(variants) => {
                let i = varint(b, at)?;
                let v = usize::try_from(i)
                    .ok()
                    .and_then(|i| variants.get(i))
                    .ok_or_else(|| format!("union index {i} of {} branches", variants.len()))?;
                self.skip(*v, b, at, depth + 1)
            }
        }
    }

    /// A string: a length, then that many bytes of UTF-8 (the decoder
    /// does not look; a batch holding one that is not UTF-8 fails whole).
    fn skip_string(&self, b: &[u8], at: &mut usize) -> std::result::Result<(), String> {
        let len = length(b, at)?;
        let s = take(b, at, len)?;
        std::str::from_utf8(s)
            .map(|_| ())
            .map_err(|_| "a string that is not UTF-8".to_string())
    }

    /// Array and map blocks: a count (negative: its size in bytes follows),
    /// its items, until a count of 0.
    fn blocks(
        &self,
        b: &[u8],
        at: &mut usize,
        item: impl Fn(&Shape, &[u8], &mut usize) -> std::result::Result<(), String>,
    ) -> std::result::Result<(), String> {
        loop {
            let count = varint(b, at)?;
            if count == 0 {
                return Ok(());
            }
            if count < 0 {
                length(b, at)?;
            }
            let n = count.unsigned_abs();
            // A count beyond the bytes left is only whole if its items
            // take no bytes (nulls, empty records), whose encoding is the
            // count alone: checking one stands for all, so a huge count
            // cannot spin.
            if n > (b.len() - *at) as u64 {
                let mut probe = *at;
                if item(self, b, &mut probe).is_ok() && probe == *at {
                    continue;
                }
                return Err(format!("a block of {n} items in {} bytes", b.len() - *at));
            }
            for _ in 0..n {
                item(self, b, at)?;
            }
        }
    }
}

#[inline]
fn take<'a>(b: &'a [u8], at: &mut usize, n: usize) -> std::result::Result<&'a [u8], String> {
    let end = at
        .checked_add(n)
        .filter(|e| *e <= b.len())
        .ok_or_else(|| format!("the record ends early ({} bytes)", b.len()))?;
    let s = &b[*at..end];
    *at = end;
    Ok(s)
}

/// A zig-zag varint.
#[inline]
fn varint(b: &[u8], at: &mut usize) -> std::result::Result<i64, String> {
    // Most are one byte: small counts, lengths, union indexes.
    if let Some(&byte) = b.get(*at)
        && byte & 0x80 == 0
    {
        *at += 1;
        let v = u64::from(byte);
        return Ok(((v >> 1) as i64) ^ -((v & 1) as i64));
    }
    let mut v: u64 = 0;
    for shift in (0..70).step_by(7) {
        let byte = *b
            .get(*at)
            .ok_or_else(|| format!("the record ends early ({} bytes)", b.len()))?;
        *at += 1;
        if shift == 63 && byte > 1 {
            return Err("a varint longer than 64 bits".into());
        }
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(((v >> 1) as i64) ^ -((v & 1) as i64));
        }
    }
    Err("a varint longer than 10 bytes".into())
}

/// A length: a varint that is not negative.
fn length(b: &[u8], at: &mut usize) -> std::result::Result<usize, String> {
    let n = varint(b, at)?;
    usize::try_from(n).map_err(|_| format!("a negative length {n}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zz(v: i64, out: &mut Vec<u8>) {
        let mut u = ((v << 1) ^ (v >> 63)) as u64;
        loop {
            let b = (u & 0x7f) as u8;
            u >>= 7;
            if u == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }

    #[test]
    fn records_are_checked_without_decoding() {
        let s = Shape::of(
            r#"{"type": "record", "name": "C", "fields": [
                {"name": "u", "type": "string"},
                {"name": "p", "type": ["null", "double"]},
                {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-millis"}},
                {"name": "tags", "type": {"type": "array", "items": "string"}},
                {"name": "next", "type": ["null", "C"]}
            ]}"#,
        )
        .expect("shape");
        let mut r = Vec::new();
        zz(2, &mut r);
        r.extend(b"u1");
        zz(1, &mut r);
        r.extend(1.5f64.to_le_bytes());
        zz(1_700_000_000_000, &mut r);
        zz(1, &mut r);
        zz(1, &mut r);
        r.extend(b"a");
        zz(0, &mut r);
        zz(0, &mut r);
        assert_eq!(s.check(&r), Ok(()));
        assert!(s.check(&r[..r.len() - 1]).is_err(), "cut short");
        let mut more = r.clone();
        more.push(0);
        assert!(s.check(&more).is_err(), "bytes left over");
        let mut bad = r.clone();
        bad[3] = 5;
        assert!(s.check(&bad).is_err(), "a union index out of range");
    }

    #[test]
    fn named_types_maps_and_counts() {
        let s = Shape::of(
            r#"{"type": "record", "name": "a.b.R", "fields": [
                {"name": "k", "type": {"type": "enum", "name": "Kind", "symbols": ["X", "Y"]}},
                {"name": "again", "type": "a.b.Kind"},
                {"name": "short", "type": "Kind"},
                {"name": "m", "type": {"type": "map", "values": "int"}},
                {"name": "nulls", "type": {"type": "array", "items": "null"}}
            ]}"#,
        )
        .expect("shape");
        let mut r = Vec::new();
        zz(1, &mut r);
        zz(0, &mut r);
        zz(1, &mut r);
        zz(1, &mut r);
        zz(1, &mut r);
        r.push(b'k');
        zz(7, &mut r);
        zz(0, &mut r);
        // A million nulls are the count alone.
        zz(1_000_000, &mut r);
        zz(0, &mut r);
        assert_eq!(s.check(&r), Ok(()));
        let mut bad = r.clone();
        bad[0] = 4; // enum index 2 of 2 symbols
        assert!(s.check(&bad).is_err());
        let mut big = Vec::new();
        zz(0, &mut big);
        zz(0, &mut big);
        zz(0, &mut big);
        // A map of a billion entries in a few bytes.
        zz(1_000_000_000, &mut big);
        assert!(s.check(&big).is_err());
        let mut wide = Vec::new();
        zz(0, &mut wide);
        zz(0, &mut wide);
        zz(0, &mut wide);
        zz(1, &mut wide);
        zz(1, &mut wide);
        wide.push(b'k');
        zz(1 << 40, &mut wide);
        assert!(s.check(&wide).is_err(), "an int beyond 32 bits");
    }
}
