//! The usage log as a restarted proxy reads it from its state dir: segment files of JSON lines,
//! the delivery position, the spool of earlier versions, the in-flight journal
//! (`usage::log::Spool`, `decode_line`, `usage::journal::recover`).
//!
//! - A line that decodes re-encodes (`encode_line`) and decodes to the same event.
//! - Delivery never gets stuck: reading and advancing from the position reaches the end of the
//!   log, with nothing pending, in a bounded number of steps.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use arbitrary::Arbitrary;
use flex_data_plane::usage::journal;
use flex_data_plane::usage::log::{
    decode_line, encode_line, Spool, LEGACY_OFFSET_FILE, LEGACY_SPOOL_FILE, POSITION_FILE,
    SEGMENT_PREFIX, SEGMENT_SUFFIX,
};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct StateDir {
    position: Option<Vec<u8>>,
    segments: Vec<(u8, Vec<u8>)>,
    legacy: Option<(Vec<u8>, Vec<u8>)>,
    journal: Option<Vec<u8>>,
    read_max: u8,
}

fn dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let parent = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        // One dir per process (fork mode runs several); those of processes gone are removed.
        if let Ok(entries) = std::fs::read_dir(&parent) {
            for e in entries.flatten() {
                let name = e.file_name();
                let pid = name.to_str().and_then(|n| n.strip_prefix(PREFIX));
                if pid.is_some_and(|p| !Path::new("/proc").join(p).exists()) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        parent.join(format!("{PREFIX}{}", std::process::id()))
    })
}

const PREFIX: &str = "flex-fuzz-usage-";

fn check_line(line: &[u8]) {
    if let Some(Ok(event)) = decode_line(line) {
        let mut buf = Vec::new();
        assert!(encode_line(&event, &mut buf).is_ok());
        assert_eq!(buf.last(), Some(&b'\n'));
        let back = decode_line(&buf).and_then(Result::ok);
        assert_eq!(back.as_ref(), Some(&event), "round trip of {event:?}");
    }
}

fuzz_target!(|input: StateDir| {
    for line in input
        .segments
        .iter()
        .flat_map(|(_, bytes)| bytes.split(|b| *b == b'\n'))
    {
        check_line(line);
    }

    let d = dir();
    let _ = std::fs::remove_dir_all(d);
    if std::fs::create_dir_all(d).is_err() {
        return;
    }
    if let Some(p) = &input.position {
        let _ = std::fs::write(d.join(POSITION_FILE), p);
    }
    for (seq, bytes) in input.segments.iter().take(4) {
        let name = format!("{SEGMENT_PREFIX}{seq:020}{SEGMENT_SUFFIX}");
        let _ = std::fs::write(d.join(name), bytes);
    }
    if let Some((spool, offset)) = &input.legacy {
        let _ = std::fs::write(d.join(LEGACY_SPOOL_FILE), spool);
        let _ = std::fs::write(d.join(LEGACY_OFFSET_FILE), offset);
    }
    if let Some(j) = &input.journal {
        let _ = std::fs::write(d.join(journal::INFLIGHT_FILE), j);
    }
    let _ = journal::recover(d);

    let Ok(mut spool) = Spool::open(d, 1 << 30) else {
        return;
    };
    let max = usize::from(input.read_max).max(1);
    let total: u64 = input
        .segments
        .iter()
        .map(|(_, b)| b.len() as u64 + 1)
        .sum::<u64>()
        + input.legacy.as_ref().map_or(0, |(s, _)| s.len() as u64 + 1);
    let mut steps = 0u64;
    loop {
        let Ok(chunk) = spool.read(max) else {
            return;
        };
        if !chunk.moved() {
            break;
        }
        assert!(chunk.end > chunk.start, "a read moves forward");
        if spool.advance(chunk.end).is_err() {
            return;
        }
        steps += 1;
        assert!(steps <= total + 8, "delivery does not end ({steps} reads)");
    }
    assert_eq!(
        spool.pending_bytes(),
        0,
        "delivery stopped with bytes pending at {:?}",
        spool.position()
    );
});
