//! Feature rows on disk: a raw file of little-endian f32, `dim` values per row, written
//! as the rows are computed and read back chunk by chunk, so a kNN bank larger than
//! memory can be evaluated (`eval.knn_device = "auto"`).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::EvalRunError;
use super::features::Rows;

/// Appends feature rows to a raw f32 file.
#[derive(Debug)]
pub struct FeatureWriter {
    path: PathBuf,
    out: BufWriter<File>,
    dim: Option<usize>,
    rows: usize,
}

impl FeatureWriter {
    /// Creates (or truncates) `path`.
    ///
    /// # Errors
    ///
    /// [`EvalRunError::Write`] if the file cannot be created.
    pub fn create(path: &Path) -> Result<Self, EvalRunError> {
        let file = File::create(path).map_err(|source| write_error(path, source))?;
        Ok(FeatureWriter {
            path: path.to_path_buf(),
            out: BufWriter::with_capacity(1 << 20, file),
            dim: None,
            rows: 0,
        })
    }

    /// Appends `rows` (all of one width, the width of the first row ever appended).
    ///
    /// # Errors
    ///
    /// [`EvalRunError::Input`] for a row of another width, [`EvalRunError::Write`] if
    /// the file system refuses the bytes.
    pub fn append(&mut self, rows: &[Vec<f32>]) -> Result<(), EvalRunError> {
        for row in rows {
            let dim = *self.dim.get_or_insert(row.len());
            if row.len() != dim {
                return Err(hsat_core::eval::EvalInputError::BadInput(format!(
                    "feature rows differ in width ({} vs {dim}): one backbone writes one file",
                    row.len()
                ))
                .into());
            }
            let bytes: Vec<u8> = row.iter().flat_map(|x| x.to_le_bytes()).collect();
            self.out
                .write_all(&bytes)
                .map_err(|source| write_error(&self.path, source))?;
            self.rows += 1;
        }
        Ok(())
    }

    /// Flushes the file and returns a reader of it.
    ///
    /// # Errors
    ///
    /// [`EvalRunError::Write`] if the last bytes cannot be written or the file reopened.
    pub fn finish(self) -> Result<FeatureFile, EvalRunError> {
        let FeatureWriter {
            path,
            out,
            dim,
            rows,
        } = self;
        out.into_inner()
            .map_err(|e| write_error(&path, e.into_error()))?
            .sync_data()
            .map_err(|source| write_error(&path, source))?;
        FeatureFile::open(&path, rows, dim.unwrap_or(0))
    }
}

/// A raw f32 feature file, read by row ranges (positioned reads: one open file can
/// serve several threads).
#[derive(Debug)]
pub struct FeatureFile {
    path: PathBuf,
    file: File,
    rows: usize,
    dim: usize,
}

impl FeatureFile {
    /// Opens `path` holding `rows` rows of `dim` values.
    ///
    /// # Errors
    ///
    /// [`EvalRunError::Write`] (naming the file) if it cannot be opened or its size is
    /// not `rows * dim * 4` bytes.
    pub fn open(path: &Path, rows: usize, dim: usize) -> Result<Self, EvalRunError> {
        let file = File::open(path).map_err(|source| write_error(path, source))?;
        let len = file
            .metadata()
            .map_err(|source| write_error(path, source))?
            .len();
        let expected = (rows * dim * 4) as u64;
        if len != expected {
            return Err(write_error(
                path,
                std::io::Error::other(format!(
                    "the feature file has {len} bytes, expected {expected} ({rows} rows x {dim} f32)"
                )),
            ));
        }
        Ok(FeatureFile {
            path: path.to_path_buf(),
            file,
            rows,
            dim,
        })
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Values per row.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Rows `start..start + count`, flat (row-major), into `out` (replacing its content).
    ///
    /// # Errors
    ///
    /// [`EvalRunError::Write`] (naming the file) if the read fails.
    pub fn read_flat(
        &self,
        start: usize,
        count: usize,
        out: &mut Vec<f32>,
    ) -> Result<(), EvalRunError> {
        assert!(start + count <= self.rows, "rows past the end of the file");
        let mut bytes = vec![0u8; count * self.dim * 4];
        self.file
            .read_exact_at(&mut bytes, (start * self.dim * 4) as u64)
            .map_err(|source| write_error(&self.path, source))?;
        out.clear();
        out.extend(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        );
        Ok(())
    }

    /// Every row in memory (for `eval.knn_device = "cpu_exact"`).
    ///
    /// # Errors
    ///
    /// As [`read_flat`](Self::read_flat).
    pub fn read_all(&self) -> Result<Rows, EvalRunError> {
        let mut flat = Vec::new();
        self.read_flat(0, self.rows, &mut flat)?;
        Ok(flat.chunks(self.dim.max(1)).map(<[f32]>::to_vec).collect())
    }
}

fn write_error(path: &Path, source: std::io::Error) -> EvalRunError {
    EvalRunError::Write {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_written_are_read_back_by_range() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bank.f32");
        let rows: Rows = (0..5)
            .map(|r| (0..3).map(|c| (r * 3 + c) as f32 * 0.5 - 1.0).collect())
            .collect();
        let mut writer = FeatureWriter::create(&path).expect("create");
        writer.append(&rows[..2]).expect("append");
        writer.append(&rows[2..]).expect("append");
        let file = writer.finish().expect("finish");
        assert_eq!((file.rows(), file.dim()), (5, 3));
        let mut flat = Vec::new();
        file.read_flat(1, 3, &mut flat).expect("read");
        assert_eq!(flat, rows[1..4].concat());
        assert_eq!(file.read_all().expect("all"), rows);
        assert!(matches!(
            FeatureFile::open(&path, 6, 3),
            Err(EvalRunError::Write { .. })
        ));
    }

    #[test]
    fn a_row_of_another_width_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut writer = FeatureWriter::create(&dir.path().join("f")).expect("create");
        let err = writer
            .append(&[vec![1.0, 2.0], vec![1.0]])
            .expect_err("ragged");
        assert!(err.to_string().contains("differ in width"), "{err}");
    }
}
