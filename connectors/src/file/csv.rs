//! CSV files with a header line, read record by record with bounded
//! memory (csv-core): every field as text, an empty field as NULL. A
//! record with more or fewer fields than the header, or that is not UTF-8,
//! or longer than `max_record_bytes`, is a bad row named by the line it
//! starts on; the rows around it are read on.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, StringBuilder};
use csv_core::{ReadRecordResult, Reader};
use sluice_engine::DeadLetterKind;

/// Most columns a header may name.
const MAX_COLUMNS: usize = 65_536;

/// A record that is not a row.
#[derive(Debug, Clone)]
pub(crate) struct BadRecord {
    /// The line it starts on (1 is the header).
    pub line: u64,
    /// Its first bytes.
    pub bytes: Vec<u8>,
    /// Why.
    pub kind: DeadLetterKind,
    /// The reason, for the dead letter.
    pub reason: String,
}

/// Rows of one read: a text column per header field, each row's line, and
/// the bad records among them.
#[derive(Debug)]
pub(crate) struct CsvChunk {
    /// One `Utf8` column per header field.
    pub columns: Vec<ArrayRef>,
    /// The line each row starts on.
    pub lines: Vec<u64>,
    /// Records that are not rows.
    pub bad: Vec<BadRecord>,
    /// Records consumed (rows and bad ones).
    pub records: u64,
}

/// A CSV file being read.
pub(crate) struct CsvRecords {
    input: BufReader<File>,
    core: Reader,
    header: Vec<String>,
    max_record_bytes: usize,
    /// The line the reader is on (1-based).
    line: u64,
    out: Vec<u8>,
    ends: Vec<usize>,
    /// The first bytes of the current record as read (a dead letter's preview).
    raw: Vec<u8>,
    eof: bool,
}

/// One record as csv-core left it in `out`/`ends`, or why it is none.
enum Got {
    Record {
        line: u64,
        fields: usize,
        oversized: bool,
        extra: bool,
    },
    End,
}

impl CsvRecords {
    /// Opens `path` and reads its header (`Err` text: no header).
    pub fn open(path: &Path, max_record_bytes: usize) -> std::io::Result<Result<Self, String>> {
        let file = File::open(path)?;
        let mut r = CsvRecords {
            input: BufReader::with_capacity(1 << 20, file),
            core: Reader::new(),
            header: Vec::new(),
            max_record_bytes,
            line: 1,
            out: vec![0; 4096],
            ends: vec![0; 64],
            raw: Vec::new(),
            eof: false,
        };
        let got = r.next_record(MAX_COLUMNS)?;
        let Got::Record {
            fields,
            oversized,
            extra,
            ..
        } = got
        else {
            return Ok(Err("no header line".into()));
        };
        if oversized || extra {
            return Ok(Err(format!(
                "the header line is longer than max_record_bytes = {max_record_bytes} or has more than {MAX_COLUMNS} columns"
            )));
        }
        let mut header = Vec::with_capacity(fields);
        let mut from = 0;
        for &end in &r.ends[..fields] {
            let Ok(name) = std::str::from_utf8(&r.out[from..end]) else {
                return Ok(Err("the header line is not UTF-8".into()));
            };
            header.push(name.trim().to_string());
            from = end;
        }
        if header.iter().all(String::is_empty) {
            return Ok(Err("no header line".into()));
        }
        r.header = header;
        Ok(Ok(r))
    }

    /// The header's column names.
    pub fn header(&self) -> &[String] {
        &self.header
    }

    /// Reads the next record into `out`/`ends`. Fields past `max_fields`
    /// are not kept (the record is marked `extra`); bytes past
    /// `max_record_bytes` neither (marked `oversized`, a preview kept).
    fn next_record(&mut self, max_fields: usize) -> std::io::Result<Got> {
        let mut nout = 0;
        let mut nend = 0;
        let mut oversized = false;
        let mut extra = false;
        let mut start_line: Option<u64> = None;
        // Bytes of the record as read (quotes and separators included).
        let mut raw_len = 0usize;
        self.raw.clear();
        loop {
            let input = if self.eof {
                &[][..]
            } else {
                match self.input.fill_buf() {
                    Ok(b) => b,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            };
            let at_end = input.is_empty();
            // Line breaks before a record are skipped (csv-core would skip
            // them too); the record starts on the line of its first byte.
            let mut skip = 0;
            if start_line.is_none() {
                while skip < input.len() && matches!(input[skip], b'\n' | b'\r') {
                    if input[skip] == b'\n' {
                        self.line += 1;
                    }
                    skip += 1;
                }
                if skip == input.len() && !at_end {
                    self.input.consume(skip);
                    continue;
                }
                start_line = Some(self.line);
            }
            let (res, nin, o, e) = self.core.read_record(
                &input[skip..],
                &mut self.out[nout..],
                &mut self.ends[nend..],
            );
            let consumed = &input[skip..skip + nin];
            let newlines = memchr::memchr_iter(b'\n', consumed).count() as u64;
            raw_len += nin;
            let room = crate::json::RECORD_PREVIEW.saturating_sub(self.raw.len());
            self.raw.extend_from_slice(&consumed[..nin.min(room)]);
            if at_end {
                self.eof = true;
            } else {
                self.input.consume(skip + nin);
            }
            self.line += newlines;
            nout += o;
            nend += e;
            match res {
                ReadRecordResult::InputEmpty => {}
                ReadRecordResult::OutputFull => {
                    if nout >= self.max_record_bytes {
                        // Past the limit: read the record through, keeping
                        // only a preview of it.
                        oversized = true;
                        let keep = (self.out.len() / 2).min(crate::json::RECORD_PREVIEW);
                        nout = nout.min(keep);
                        for end in &mut self.ends[..nend] {
                            *end = (*end).min(nout);
                        }
                    } else {
                        let grow =
                            (self.out.len() * 2).min(self.max_record_bytes.saturating_add(1));
                        let len = grow.max(self.out.len() + 1);
                        self.out.resize(len, 0);
                    }
                }
                ReadRecordResult::OutputEndsFull => {
                    if nend > max_fields {
                        // More fields than wanted: keep counting none.
                        extra = true;
                        nend = max_fields;
                    } else {
                        let n = self.ends.len() * 2;
                        self.ends.resize(n, 0);
                    }
                }
                ReadRecordResult::Record => {
                    // The record's size as read, its line break aside.
                    let len = raw_len.saturating_sub(1);
                    return Ok(Got::Record {
                        line: start_line.unwrap_or(self.line),
                        fields: nend,
                        oversized: oversized || len > self.max_record_bytes,
                        extra: extra || nend > max_fields,
                    });
                }
                ReadRecordResult::End => return Ok(Got::End),
            }
        }
    }

    /// Reads up to `max_rows` records (`None` at the end of the file).
    pub fn next_chunk(&mut self, max_rows: usize) -> std::io::Result<Option<CsvChunk>> {
        let width = self.header.len();
        let mut builders: Vec<StringBuilder> = (0..width).map(|_| StringBuilder::new()).collect();
        let mut lines = Vec::new();
        let mut bad = Vec::new();
        let mut records = 0u64;
        while lines.len() + bad.len() < max_rows {
            let Got::Record {
                line,
                fields,
                oversized,
                extra,
            } = self.next_record(width)?
            else {
                break;
            };
            records += 1;
            let mut shown = self.raw.as_slice();
            while let [rest @ .., b'\n' | b'\r'] = shown {
                shown = rest;
            }
            let fail = |kind, reason: String| BadRecord {
                line,
                bytes: shown.to_vec(),
                kind,
                reason,
            };
            if oversized {
                bad.push(fail(
                    DeadLetterKind::Oversized,
                    format!(
                        "record longer than max_record_bytes = {}",
                        self.max_record_bytes
                    ),
                ));
                continue;
            }
            if extra || fields != width {
                bad.push(fail(
                    DeadLetterKind::MalformedRecord,
                    format!(
                        "{} fields where the header has {width}",
                        if extra {
                            format!("more than {width}")
                        } else {
                            fields.to_string()
                        }
                    ),
                ));
                continue;
            }
            // Each field on its own: two halves of a character in two
            // fields are not a character.
            let ends = &self.ends[..fields];
            let field = |i: usize| {
                let from = if i == 0 { 0 } else { ends[i - 1] };
                std::str::from_utf8(&self.out[from..ends[i]])
            };
            if (0..fields).any(|i| field(i).is_err()) {
                bad.push(fail(
                    DeadLetterKind::MalformedRecord,
                    "a field is not UTF-8".into(),
                ));
                continue;
            }
            for (i, b) in builders.iter_mut().enumerate() {
                match field(i) {
                    Ok(v) if !v.is_empty() => b.append_value(v),
                    _ => b.append_null(),
                }
            }
            lines.push(line);
        }
        if records == 0 {
            return Ok(None);
        }
        Ok(Some(CsvChunk {
            columns: builders
                .into_iter()
                .map(|mut b| Arc::new(b.finish()) as ArrayRef)
                .collect(),
            lines,
            bad,
            records,
        }))
    }

    /// Passes over `n` records (a checkpoint's position inside the file).
    pub fn skip(&mut self, n: u64) -> std::io::Result<()> {
        for _ in 0..n {
            if matches!(self.next_record(self.header.len())?, Got::End) {
                break;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use arrow::array::{Array, AsArray};

    use super::*;

    type Rows = Vec<(u64, Vec<Option<String>>)>;

    fn read(body: &[u8], max: usize) -> (Vec<String>, Rows, Vec<BadRecord>) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.csv");
        std::fs::File::create(&p).unwrap().write_all(body).unwrap();
        let mut r = CsvRecords::open(&p, max).unwrap().unwrap();
        let header = r.header().to_vec();
        let mut rows = Vec::new();
        let mut bad = Vec::new();
        while let Some(c) = r.next_chunk(2).unwrap() {
            for (i, line) in c.lines.iter().enumerate() {
                let vals = c
                    .columns
                    .iter()
                    .map(|col| {
                        let s = col.as_string::<i32>();
                        s.is_valid(i).then(|| s.value(i).to_string())
                    })
                    .collect();
                rows.push((*line, vals));
            }
            bad.extend(c.bad);
        }
        (header, rows, bad)
    }

    #[test]
    fn bad_records_are_named_by_line_and_the_rest_read_on() {
        let body = b"user_id,price\r\nu1,1.5\nu2,2,extra\n\nu3\n\"u\n4\",4\nu5,\xff\nu6,6";
        let (header, rows, bad) = read(body, 1 << 20);
        assert_eq!(header, ["user_id", "price"]);
        let got: Vec<(u64, Vec<Option<&str>>)> = rows
            .iter()
            .map(|(l, v)| (*l, v.iter().map(|x| x.as_deref()).collect()))
            .collect();
        assert_eq!(
            got,
            vec![
                (2, vec![Some("u1"), Some("1.5")]),
                (6, vec![Some("u\n4"), Some("4")]),
                (9, vec![Some("u6"), Some("6")]),
            ]
        );
        let lines: Vec<(u64, DeadLetterKind)> = bad.iter().map(|b| (b.line, b.kind)).collect();
        assert_eq!(
            lines,
            vec![
                (3, DeadLetterKind::MalformedRecord),
                (5, DeadLetterKind::MalformedRecord),
                (8, DeadLetterKind::MalformedRecord),
            ]
        );
        assert!(bad[0].reason.contains("more than 2"), "{}", bad[0].reason);
        assert!(bad[1].reason.contains("1 fields"), "{}", bad[1].reason);
        assert!(bad[2].reason.contains("UTF-8"), "{}", bad[2].reason);
        // The record as it was read, separators included.
        assert_eq!(bad[0].bytes, b"u2,2,extra");
        // Half a character in each of two fields: not UTF-8, never a panic.
        let (_, rows, bad) = read(b"a,b\n\xc3,\xa9\nx,y\n", 1 << 20);
        assert_eq!(rows.len(), 1);
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].kind, DeadLetterKind::MalformedRecord);
    }

    #[test]
    fn a_small_limit_holds_for_short_records_too() {
        let (_, rows, bad) = read(b"a,b\nxx,yy\n\"xxxxxxxxxxxxxxxx\",1\n", 10);
        assert_eq!(rows.len(), 1);
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].kind, DeadLetterKind::Oversized);
    }

    #[test]
    fn a_long_record_costs_bounded_memory_and_is_oversized() {
        let mut body = b"a,b\nx,1\n".to_vec();
        body.extend(std::iter::repeat_n(b'z', 3 << 20));
        body.extend(b",2\ny,3\n");
        let (_, rows, bad) = read(&body, 1 << 16);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].0, 4);
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].line, 3);
        assert_eq!(bad[0].kind, DeadLetterKind::Oversized);
        assert!(bad[0].bytes.len() <= crate::json::RECORD_PREVIEW);
        // A line of commas is as bounded as a line of letters.
        let mut body = b"a,b\n".to_vec();
        body.extend(std::iter::repeat_n(b',', 1 << 20));
        body.extend(b"\ny,3\n");
        let (_, rows, bad) = read(&body, 1 << 16);
        assert_eq!(rows.len(), 1);
        assert_eq!(bad.len(), 1);
    }
}
