//! Dead letters as JSON lines under the state dir. The file's committed
//! length is part of each checkpoint; a restart cuts off what came after, so
//! a replayed record is not reported twice.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use sluice_engine::{DeadLetter, DeadLetterSink, EngineError, Result};

/// File name of the dead-letter output inside the state dir.
pub const DEAD_LETTER_FILE: &str = "dead_letters.jsonl";

/// Appends dead letters to `{state_dir}/dead_letters.jsonl`.
pub struct DeadLetterFile {
    path: PathBuf,
    out: Option<BufWriter<File>>,
}

impl DeadLetterFile {
    /// The dead-letter file of a state dir.
    pub fn new(state_dir: &Path) -> Self {
        DeadLetterFile {
            path: state_dir.join(DEAD_LETTER_FILE),
            out: None,
        }
    }

    /// Dead letters appended to `path`.
    pub fn at(path: &Path) -> Self {
        DeadLetterFile {
            path: path.to_path_buf(),
            out: None,
        }
    }

    fn io(&self, e: std::io::Error) -> EngineError {
        EngineError::Io {
            path: self.path.display().to_string(),
            source: e,
        }
    }

    fn writer(&mut self) -> Result<&mut BufWriter<File>> {
        if self.out.is_none() {
            if let Some(d) = self.path.parent() {
                std::fs::create_dir_all(d).map_err(|e| self.io(e))?;
            }
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .map_err(|e| self.io(e))?;
            self.out = Some(BufWriter::new(f));
        }
        match self.out.as_mut() {
            Some(w) => Ok(w),
            None => Err(EngineError::Connector {
                what: "dead letters".into(),
                message: "writer not open".into(),
            }),
        }
    }
}

impl DeadLetterSink for DeadLetterFile {
    fn write(&mut self, letter: &DeadLetter) -> Result<()> {
        let mut line = serde_json::to_vec(letter).map_err(|e| EngineError::Connector {
            what: "dead letters".into(),
            message: e.to_string(),
        })?;
        line.push(b'\n');
        let path = self.path.display().to_string();
        self.writer()?
            .write_all(&line)
            .map_err(|e| EngineError::Io { path, source: e })
    }

    fn commit(&mut self) -> Result<u64> {
        let path = self.path.display().to_string();
        let w = self.writer()?;
        w.flush().map_err(|e| EngineError::Io {
            path: path.clone(),
            source: e,
        })?;
        let f = w.get_ref();
        f.sync_data().map_err(|e| EngineError::Io {
            path: path.clone(),
            source: e,
        })?;
        Ok(f.metadata()
            .map_err(|e| EngineError::Io { path, source: e })?
            .len())
    }

    fn recover(&mut self, committed_len: u64) -> Result<()> {
        self.out = None;
        if let Ok(m) = std::fs::metadata(&self.path)
            && m.len() > committed_len
        {
            let f = OpenOptions::new()
                .write(true)
                .open(&self.path)
                .map_err(|e| self.io(e))?;
            f.set_len(committed_len).map_err(|e| self.io(e))?;
            f.sync_all().map_err(|e| self.io(e))?;
        }
        Ok(())
    }
}
