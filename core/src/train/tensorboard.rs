//! TensorBoard event files for `--report-to tensorboard`: each logged step
//! of `metrics.jsonl` also becomes one `Event` of scalars in
//! `RUN/tensorboard/events.out.tfevents.<secs>.<host>.<pid>.clipa`.
//!
//! No maintained Rust crate writes them, and the format is small, so this
//! writes it by hand: TFRecord framing (tensorflow `core/lib/io/record_writer.cc`:
//! little-endian length, masked CRC-32C of the length, the data, masked
//! CRC-32C of the data) around the few `Event` and `Summary` fields a scalar
//! needs (tensorflow `core/util/event.proto`, `core/framework/summary.proto`),
//! encoded as protobuf by the tiny [`Message`] builder below.
//!
//! Each session (a fresh run or a resume) writes a new file; TensorBoard
//! reads every file of the folder in name order. A session starts with a
//! `SessionLog` START at its first step, which tells TensorBoard to drop
//! what an earlier, killed session logged from that step on, as
//! `metrics.jsonl` does.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use super::StepMetrics;
use crate::{Error, Result};

/// The run subfolder that holds the event files.
pub const FOLDER: &str = "tensorboard";

/// An open event file, written one step at a time.
pub struct EventWriter {
    path: PathBuf,
    file: File,
}

impl EventWriter {
    /// Creates a new event file in `dir` (made if missing) and writes its
    /// header: the file version, then a session start at `first_step`, the
    /// first step this session will log.
    pub fn create(dir: &Path, first_step: u64) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let name = format!(
            "events.out.tfevents.{}.{}.{}.clipa",
            file_secs(dir, now),
            hostname(),
            std::process::id()
        );
        let path = dir.join(name);
        // Appending, never truncating: [`file_secs`] gives each session a
        // new name, and should one exist, a second header is harmless.
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let mut writer = Self { path, file };
        let t = wall_time();
        let version = event(t, 0).bytes(3, b"brain.Event:2");
        // Event.session_log (field 7) = SessionLog { status: START (1) }.
        let start = event(t, first_step).bytes(7, &Message::default().uint(1, 1).0);
        writer.write(&[version, start])?;
        Ok(writer)
    }

    /// The event file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes one event of scalars (`tag`, value) at `step` and flushes it,
    /// so a killed run keeps every step it logged.
    pub fn scalars(&mut self, step: u64, scalars: &[(String, f64)]) -> Result<()> {
        let summary = scalars
            .iter()
            .fold(Message::default(), |summary, (tag, value)| {
                // Summary.Value { tag: 1, simple_value: 2 }.
                let value = Message::default()
                    .bytes(1, tag.as_bytes())
                    .float(2, *value as f32);
                summary.bytes(1, &value.0)
            });
        self.write(&[event(wall_time(), step).bytes(5, &summary.0)])
    }

    /// Frames `events` as records and writes them in one call.
    fn write(&mut self, events: &[Message]) -> Result<()> {
        let mut buf = Vec::new();
        for e in events {
            record(&e.0, &mut buf);
        }
        self.file
            .write_all(&buf)
            .and_then(|_| self.file.flush())
            .map_err(|e| Error::io(&self.path, e))
    }
}

/// The scalars of one logged step, named as OpenCLIP's TensorBoard logging
/// names them (`train/`, `eval/`); `train/logit_scale` is the temperature
/// `exp(logit_scale)`, OpenCLIP's `scale`.
pub fn step_scalars(m: &StepMetrics) -> Vec<(String, f64)> {
    let mut out: Vec<(String, f64)> = [
        ("train/loss", m.loss),
        ("train/lr", m.lr),
        ("train/logit_scale", m.temperature),
        ("train/samples_per_second", m.images_per_sec),
        ("train/grad_norm", m.grad_norm),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    if let Some(top1) = m.zeroshot_top1 {
        out.push(("eval/zeroshot_top1".into(), top1));
    }
    out.extend(m.evals.iter().map(|(k, v)| (format!("eval/{k}"), *v)));
    out
}

/// The seconds for a new file's name: `now`, or one past the newest event
/// file already in `dir`, so that the new file sorts after it (TensorBoard
/// reads files in name order, and a quick resume starts within a second).
fn file_secs(dir: &Path, now: u64) -> u64 {
    let newest = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            let rest = name.strip_prefix("events.out.tfevents.")?;
            rest.split('.').next()?.parse::<u64>().ok()
        })
        .max();
    newest.map_or(now, |n| now.max(n + 1))
}

/// Seconds since the Unix epoch, as `Event.wall_time`.
fn wall_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The machine's name for the file name (`/etc/hostname`), or `localhost`.
fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().replace(['/', '\\'], "_"))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// An `Event { wall_time: 1, step: 2 }`, to which the caller adds its
/// payload.
fn event(wall_time: f64, step: u64) -> Message {
    Message::default().double(1, wall_time).uint(2, step)
}

/// A protobuf message being encoded: fields appended in order.
#[derive(Default)]
struct Message(Vec<u8>);

impl Message {
    /// A field's key: its number and wire type (0 varint, 1 fixed64,
    /// 2 length-delimited, 5 fixed32).
    fn key(mut self, field: u32, wire: u32) -> Self {
        varint(u64::from(field << 3 | wire), &mut self.0);
        self
    }

    /// A varint field (`int64`, `uint64`, `enum`).
    fn uint(self, field: u32, v: u64) -> Self {
        let mut m = self.key(field, 0);
        varint(v, &mut m.0);
        m
    }

    /// A length-delimited field (`string`, `bytes`, a sub-message).
    fn bytes(self, field: u32, v: &[u8]) -> Self {
        let mut m = self.key(field, 2);
        varint(v.len() as u64, &mut m.0);
        m.0.extend_from_slice(v);
        m
    }

    /// A `double` field.
    fn double(self, field: u32, v: f64) -> Self {
        let mut m = self.key(field, 1);
        m.0.extend_from_slice(&v.to_le_bytes());
        m
    }

    /// A `float` field.
    fn float(self, field: u32, v: f32) -> Self {
        let mut m = self.key(field, 5);
        m.0.extend_from_slice(&v.to_le_bytes());
        m
    }
}

/// Appends `v` as a protobuf varint: 7 bits a byte, low first, the high
/// bit set on every byte but the last.
fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Appends `data` as one TFRecord: length (u64 LE), its masked CRC, the
/// data, the data's masked CRC (both u32 LE).
fn record(data: &[u8], out: &mut Vec<u8>) {
    let len = (data.len() as u64).to_le_bytes();
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
}

/// TFRecord's masked CRC: rotated right by 15 bits plus a constant, so
/// that a CRC of data holding CRCs is not trivially zero.
fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), one table
/// look-up a byte: records are a few hundred bytes, so no SIMD is needed.
fn crc32c(data: &[u8]) -> u32 {
    !data.iter().fold(!0u32, |c, &b| {
        CRC32C_TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8)
    })
}

/// The CRC of each byte value, computed at compile time.
const CRC32C_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 == 1 {
                (c >> 1) ^ 0x82f6_3b78
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn crc32c_has_its_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    /// The mask rotates, then adds; an empty input's CRC is 0, so its mask
    /// is the constant alone.
    #[test]
    fn masking_rotates_and_adds_the_constant() {
        assert_eq!(masked_crc(b""), 0xa282_ead8);
        // 0xe3069283 rotated right by 15 is 0x2507c60d; plus the constant.
        assert_eq!(masked_crc(b"123456789"), 0xc78a_b0e5);
    }

    #[test]
    fn varints_take_seven_bits_a_byte() {
        for (v, bytes) in [
            (0u64, &[0x00][..]),
            (1, &[0x01]),
            (127, &[0x7f]),
            (128, &[0x80, 0x01]),
            (300, &[0xac, 0x02]),
            (
                u64::MAX,
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
            ),
        ] {
            let mut out = Vec::new();
            varint(v, &mut out);
            assert_eq!(out, bytes, "{v}");
        }
        // Protobuf's own example: field 1 = 150 encodes as `08 96 01`.
        assert_eq!(Message::default().uint(1, 150).0, [0x08, 0x96, 0x01]);
    }

    /// Reads TFRecords back, checking both CRCs as TensorBoard's reader
    /// does; `None` at a wrong CRC.
    fn read_records(mut bytes: &[u8]) -> Option<Vec<Vec<u8>>> {
        let crc = |b: &[u8]| u32::from_le_bytes(b.try_into().expect("4 bytes"));
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let (len, rest) = bytes.split_at(8);
            let (len_crc, rest) = rest.split_at(4);
            let n = u64::from_le_bytes(len.try_into().expect("8 bytes")) as usize;
            let (data, rest) = rest.split_at(n);
            let (data_crc, rest) = rest.split_at(4);
            if masked_crc(len) != crc(len_crc) || masked_crc(data) != crc(data_crc) {
                return None;
            }
            out.push(data.to_vec());
            bytes = rest;
        }
        Some(out)
    }

    #[test]
    fn records_round_trip_through_a_reader() {
        let mut buf = Vec::new();
        for data in [&b"brain.Event:2"[..], b"", &[7u8; 300]] {
            record(data, &mut buf);
        }
        assert_eq!(
            read_records(&buf).unwrap(),
            [b"brain.Event:2".to_vec(), Vec::new(), vec![7u8; 300]]
        );
        // A flipped bit is caught by the data's CRC.
        buf[12] ^= 1;
        assert_eq!(read_records(&buf), None);
    }

    /// A written file holds the version, the session start and one scalar
    /// event whose bytes are the hand-checked protobuf encoding.
    #[test]
    fn a_file_holds_version_start_and_scalars() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path(), 5).unwrap();
        w.scalars(5, &[("train/loss".into(), 0.5)]).unwrap();
        let name = w.path().file_name().unwrap().to_str().unwrap().to_string();
        assert!(name.starts_with("events.out.tfevents.") && name.ends_with(".clipa"));
        let records = read_records(&std::fs::read(w.path()).unwrap()).unwrap();
        assert_eq!(records.len(), 3);
        assert!(records[0].ends_with(b"\x1a\x0dbrain.Event:2"));
        assert!(records[1].ends_with(&[0x10, 5, 0x3a, 2, 0x08, 1]));
        // step 5, summary (field 5) { value (1) { tag (1), simple_value (2) } }.
        let mut tail = vec![0x10, 5, 0x2a, 19, 0x0a, 17, 0x0a, 10];
        tail.extend_from_slice(b"train/loss");
        tail.push(0x15);
        tail.extend_from_slice(&0.5f32.to_le_bytes());
        assert_eq!(records[2][0], 0x09, "wall_time, a double, comes first");
        assert_eq!(&records[2][9..], &tail[..]);
    }

    /// `--report-to` adds to the config's list once, reaches `run.toml`
    /// and reads back; a config without it writes no key.
    #[test]
    fn report_to_is_a_flag_and_a_config_key() {
        use crate::train::overrides::TrainOverrides;
        use crate::train::{ReportTo, TrainConfig};
        let mut cfg = TrainConfig::preset("tiny").unwrap();
        assert!(!cfg.to_toml().contains("report_to"));
        cfg.apply(&TrainOverrides {
            report_to: vec![ReportTo::Tensorboard, ReportTo::Tensorboard],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(cfg.report_to, [ReportTo::Tensorboard]);
        let toml = cfg.to_toml();
        assert!(toml.contains("report_to = [\"tensorboard\"]"), "{toml}");
        let back = TrainConfig::from_toml(&toml, Path::new("run.toml")).unwrap();
        assert_eq!(back, cfg);
    }

    /// A new file sorts after the folder's newest, also within a second.
    #[test]
    fn a_new_file_sorts_after_the_last() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(file_secs(dir.path(), 100), 100);
        std::fs::write(dir.path().join("events.out.tfevents.100.h.9.clipa"), b"").unwrap();
        std::fs::write(dir.path().join("other.txt"), b"").unwrap();
        assert_eq!(file_secs(dir.path(), 100), 101);
        assert_eq!(file_secs(dir.path(), 200), 200);
        let first = EventWriter::create(dir.path(), 1).unwrap();
        let second = EventWriter::create(dir.path(), 3).unwrap();
        assert!(second.path() > first.path());
    }

    #[test]
    fn step_scalars_name_every_metric() {
        let m = StepMetrics {
            step: 3,
            stage: 0,
            loss: 2.0,
            lr: 1e-3,
            temperature: 14.3,
            grad_norm: 0.7,
            images_per_sec: 100.0,
            data_wait: 0.1,
            samples: 48,
            epoch: None,
            zeroshot_top1: Some(0.25),
            evals: BTreeMap::from([("colours/top1".to_string(), 0.5)]),
        };
        let tags: Vec<String> = step_scalars(&m).into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            tags,
            [
                "train/loss",
                "train/lr",
                "train/logit_scale",
                "train/samples_per_second",
                "train/grad_norm",
                "eval/zeroshot_top1",
                "eval/colours/top1"
            ]
        );
    }
}
