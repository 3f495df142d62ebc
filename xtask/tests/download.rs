//! The downloader against local files and a loopback HTTP server: checksum,
//! mirror, resume and error paths. No internet needed.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use md5::Md5;
use sha2::{Digest, Sha256};
use xtask::download::{self, DatasetSpec, DownloadOptions, FileSpec, Outcome, Payload, Source};

fn hex(b: &[u8]) -> String {
    download::hex(b)
}

fn sha256(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Deterministic pseudo-random bytes (xorshift), so tests need no RNG crate.
fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Every request the server saw: (path, first byte asked for by `Range`).
type RequestLog = Arc<Mutex<Vec<(String, Option<u64>)>>>;

/// How the server misbehaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Normal,
    /// Announce the full length but close after this many body bytes.
    CutAfter(usize),
    /// Ignore Range headers (always 200 with the whole file).
    IgnoreRange,
}

/// A bounded HTTP/1.1 server on 127.0.0.1: serves `files` by path, honours
/// `Range: bytes=N-`, answers at most `max_requests` requests, and stops by
/// itself after 20 s in any case. Records every request's (path, range).
struct Server {
    base: String,
    log: RequestLog,
    handle: Option<JoinHandle<()>>,
}

impl Server {
    fn start(files: Vec<(String, Vec<u8>)>, modes: Vec<Mode>, max_requests: usize) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let base = format!("http://{}/", listener.local_addr().unwrap());
        let log: RequestLog = Arc::new(Mutex::new(Vec::new()));
        let log2 = log.clone();
        let handle = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut served = 0;
            while served < max_requests && Instant::now() < deadline {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let mode = modes.get(served).copied().unwrap_or(Mode::Normal);
                        served += 1;
                        serve_one(stream, &files, mode, &log2);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Server {
            base,
            log,
            handle: Some(handle),
        }
    }

    fn requests(&self) -> Vec<(String, Option<u64>)> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Wake the accept loop if it is still waiting for requests we never
        // made, so the thread ends promptly.
        for _ in 0..64 {
            if TcpStream::connect(
                self.base
                    .trim_start_matches("http://")
                    .trim_end_matches('/'),
            )
            .is_err()
            {
                break;
            }
            if self.handle.as_ref().is_some_and(|h| h.is_finished()) {
                break;
            }
        }
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn serve_one(
    mut stream: TcpStream,
    files: &[(String, Vec<u8>)],
    mode: Mode,
    log: &Mutex<Vec<(String, Option<u64>)>>,
) {
    stream.set_nonblocking(false).ok();
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok();
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > 64 * 1024 {
            return;
        }
    }
    let text = String::from_utf8_lossy(&head).to_string();
    let path = text
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("/")
        .trim_start_matches('/')
        .to_string();
    let range = text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        if !k.trim().eq_ignore_ascii_case("range") {
            return None;
        }
        v.trim()
            .strip_prefix("bytes=")?
            .strip_suffix('-')?
            .parse::<u64>()
            .ok()
    });
    log.lock().unwrap().push((path.clone(), range));
    let Some((_, body)) = files.iter().find(|(p, _)| *p == path) else {
        let _ = stream
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return;
    };
    let len = body.len() as u64;
    let (status, start) = match range {
        Some(r) if mode != Mode::IgnoreRange => {
            if r >= len {
                let _ = write!(
                    stream,
                    "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
                return;
            }
            (206, r)
        }
        _ => (200, 0),
    };
    let mut header = format!(
        "HTTP/1.1 {} {}\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n",
        status,
        if status == 206 { "Partial Content" } else { "OK" },
        len - start
    );
    if status == 206 {
        header.push_str(&format!(
            "Content-Range: bytes {start}-{}/{len}\r\n",
            len - 1
        ));
    }
    header.push_str("\r\n");
    if stream.write_all(header.as_bytes()).is_err() {
        return;
    }
    let payload = &body[start as usize..];
    let payload = match mode {
        Mode::CutAfter(n) => &payload[..n.min(payload.len())],
        _ => payload,
    };
    let _ = stream.write_all(payload);
    let _ = stream.flush();
}

fn files_spec(base_urls: Vec<String>, files: &[(&str, &[u8])]) -> DatasetSpec {
    DatasetSpec {
        id: "toy".into(),
        dir: "toy".into(),
        payload: Payload::Files {
            base_urls,
            files: files
                .iter()
                .map(|(name, data)| FileSpec {
                    name: name.to_string(),
                    size: data.len() as u64,
                    sha256: sha256(data),
                    remote: None,
                })
                .collect(),
        },
    }
}

fn network(dir: &Path) -> DownloadOptions {
    DownloadOptions {
        data_dir: dir.to_path_buf(),
        source: Source::Network,
        progress: false,
        force: false,
    }
}

fn mirror(dir: &Path, mirror: &Path) -> DownloadOptions {
    DownloadOptions {
        data_dir: dir.to_path_buf(),
        source: Source::Mirror(mirror.to_path_buf()),
        progress: false,
        force: false,
    }
}

fn part_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "part") {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn fetches_from_the_first_working_source_and_verifies() {
    let a = bytes(200_000, 1);
    let b = bytes(1_000, 2);
    let server = Server::start(
        vec![
            ("good/a.gz".into(), a.clone()),
            ("good/b.gz".into(), b.clone()),
        ],
        vec![],
        4,
    );
    let spec = files_spec(
        vec![
            format!("{}missing/", server.base),
            format!("{}good/", server.base),
        ],
        &[("a.gz", &a), ("b.gz", &b)],
    );
    let tmp = tempfile::tempdir().unwrap();
    let done = download::download(&spec, &network(tmp.path())).unwrap();
    assert_eq!(done.len(), 2);
    assert!(done.iter().all(|(_, o)| *o == Outcome::Downloaded));
    assert_eq!(std::fs::read(tmp.path().join("toy/a.gz")).unwrap(), a);
    assert_eq!(std::fs::read(tmp.path().join("toy/b.gz")).unwrap(), b);
    assert!(part_files(tmp.path()).is_empty());
    // The 404 source was tried first for each file.
    let paths: Vec<String> = server.requests().into_iter().map(|(p, _)| p).collect();
    assert_eq!(
        paths,
        ["missing/a.gz", "good/a.gz", "missing/b.gz", "good/b.gz"]
    );

    // A second run finds both files present and asks nothing.
    let again = download::download(&spec, &network(tmp.path())).unwrap();
    assert!(again.iter().all(|(_, o)| *o == Outcome::AlreadyPresent));
}

#[test]
fn an_interrupted_download_resumes_with_a_range_request() {
    let a = bytes(300_000, 3);
    let server = Server::start(
        vec![("a.gz".into(), a.clone())],
        vec![Mode::CutAfter(120_000), Mode::Normal],
        2,
    );
    let spec = files_spec(vec![server.base.clone()], &[("a.gz", &a)]);
    let tmp = tempfile::tempdir().unwrap();
    let err = download::download(&spec, &network(tmp.path())).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("resume"), "{msg}");
    let part = tmp.path().join("toy/a.gz.part");
    assert_eq!(std::fs::metadata(&part).unwrap().len(), 120_000);
    assert!(!tmp.path().join("toy/a.gz").exists());

    let done = download::download(&spec, &network(tmp.path())).unwrap();
    assert_eq!(done[0].1, Outcome::Downloaded);
    assert_eq!(std::fs::read(tmp.path().join("toy/a.gz")).unwrap(), a);
    assert!(!part.exists());
    assert_eq!(
        server.requests(),
        [
            ("a.gz".to_string(), None),
            ("a.gz".to_string(), Some(120_000))
        ]
    );
}

#[test]
fn a_server_that_ignores_the_range_restarts_the_file() {
    let a = bytes(50_000, 4);
    let server = Server::start(vec![("a.gz".into(), a.clone())], vec![Mode::IgnoreRange], 1);
    let spec = files_spec(vec![server.base.clone()], &[("a.gz", &a)]);
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("toy")).unwrap();
    // A stale partial file with the wrong bytes: the 200 answer replaces it.
    std::fs::write(tmp.path().join("toy/a.gz.part"), vec![0xAA; 10_000]).unwrap();
    download::download(&spec, &network(tmp.path())).unwrap();
    assert_eq!(std::fs::read(tmp.path().join("toy/a.gz")).unwrap(), a);
    assert_eq!(server.requests(), [("a.gz".to_string(), Some(10_000))]);
}

#[test]
fn a_checksum_mismatch_is_an_error_and_leaves_nothing() {
    let real = bytes(40_000, 5);
    let mut served = real.clone();
    served[777] ^= 1;
    let server = Server::start(vec![("a.gz".into(), served)], vec![], 1);
    let spec = files_spec(vec![server.base.clone()], &[("a.gz", &real)]);
    let tmp = tempfile::tempdir().unwrap();
    let msg = format!(
        "{:#}",
        download::download(&spec, &network(tmp.path())).unwrap_err()
    );
    assert!(msg.contains("checksum mismatch"), "{msg}");
    assert!(msg.contains(&sha256(&real)), "{msg}");
    assert!(!tmp.path().join("toy/a.gz").exists());
    assert!(part_files(tmp.path()).is_empty());
}

#[test]
fn an_unreachable_network_names_the_mirror_option() {
    // A port that was free a moment ago: connection refused.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let a = bytes(10, 6);
    let spec = files_spec(vec![format!("http://127.0.0.1:{port}/")], &[("a.gz", &a)]);
    let tmp = tempfile::tempdir().unwrap();
    let msg = format!(
        "{:#}",
        download::download(&spec, &network(tmp.path())).unwrap_err()
    );
    assert!(msg.contains("--mirror"), "{msg}");
    assert!(msg.contains("QGRAD_MIRROR"), "{msg}");
    assert!(msg.contains(&format!("127.0.0.1:{port}")), "{msg}");
    assert!(!tmp.path().join("toy/a.gz").exists());
}

#[test]
fn mirror_layouts_flat_and_nested_are_both_accepted() {
    let a = bytes(5_000, 7);
    let b = bytes(6_000, 8);
    let spec = files_spec(vec![], &[("a.gz", &a), ("b.gz", &b)]);
    let mirror_dir = tempfile::tempdir().unwrap();
    // One nested (DIR/toy/a.gz), one flat (DIR/b.gz).
    std::fs::create_dir_all(mirror_dir.path().join("toy")).unwrap();
    std::fs::write(mirror_dir.path().join("toy/a.gz"), &a).unwrap();
    std::fs::write(mirror_dir.path().join("b.gz"), &b).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let done = download::download(&spec, &mirror(tmp.path(), mirror_dir.path())).unwrap();
    assert!(done.iter().all(|(_, o)| *o == Outcome::CopiedFromMirror));
    assert_eq!(std::fs::read(tmp.path().join("toy/a.gz")).unwrap(), a);
    assert_eq!(std::fs::read(tmp.path().join("toy/b.gz")).unwrap(), b);
}

#[test]
fn mirror_errors_missing_and_corrupt() {
    let a = bytes(5_000, 9);
    let spec = files_spec(vec![], &[("a.gz", &a)]);
    let mirror_dir = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let msg = format!(
        "{:#}",
        download::download(&spec, &mirror(tmp.path(), mirror_dir.path())).unwrap_err()
    );
    assert!(msg.contains("not in the mirror"), "{msg}");

    let mut bad = a.clone();
    bad[0] ^= 0xFF;
    std::fs::write(mirror_dir.path().join("a.gz"), &bad).unwrap();
    let msg = format!(
        "{:#}",
        download::download(&spec, &mirror(tmp.path(), mirror_dir.path())).unwrap_err()
    );
    assert!(msg.contains("checksum mismatch"), "{msg}");
    assert!(!tmp.path().join("toy/a.gz").exists());
    assert!(part_files(tmp.path()).is_empty());
}

#[test]
fn an_existing_corrupt_file_is_an_error_unless_forced() {
    let a = bytes(3_000, 10);
    let spec = files_spec(vec![], &[("a.gz", &a)]);
    let mirror_dir = tempfile::tempdir().unwrap();
    std::fs::write(mirror_dir.path().join("a.gz"), &a).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("toy")).unwrap();
    std::fs::write(tmp.path().join("toy/a.gz"), b"not the file").unwrap();
    let msg = format!(
        "{:#}",
        download::download(&spec, &mirror(tmp.path(), mirror_dir.path())).unwrap_err()
    );
    assert!(msg.contains("--force"), "{msg}");
    assert_eq!(
        std::fs::read(tmp.path().join("toy/a.gz")).unwrap(),
        b"not the file"
    );

    let mut forced = mirror(tmp.path(), mirror_dir.path());
    forced.force = true;
    download::download(&spec, &forced).unwrap();
    assert_eq!(std::fs::read(tmp.path().join("toy/a.gz")).unwrap(), a);
}

/// A `.tar.gz` with `batches/x.bin`, `batches/y.bin` and an unrelated file.
fn toy_archive(x: &[u8], y: &[u8]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    for (name, data) in [
        ("batches/x.bin", x),
        ("batches/y.bin", y),
        ("other/z.txt", b"zzz".as_slice()),
    ] {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, name, data).unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap()
}

fn archive_spec(urls: Vec<String>, archive: &[u8], x: &[u8], y: &[u8]) -> DatasetSpec {
    DatasetSpec {
        id: "toyc".into(),
        dir: "toyc".into(),
        payload: Payload::Archive {
            urls,
            archive_name: "toy.tar.gz".into(),
            archive_size: archive.len() as u64,
            archive_md5: hex(&Md5::digest(archive)),
            member_dir: "batches".into(),
            files: vec![
                FileSpec {
                    name: "x.bin".into(),
                    size: x.len() as u64,
                    sha256: sha256(x),
                    remote: None,
                },
                FileSpec {
                    name: "y.bin".into(),
                    size: y.len() as u64,
                    sha256: sha256(y),
                    remote: None,
                },
            ],
        },
    }
}

#[test]
fn archives_are_verified_by_md5_and_extracted() {
    let (x, y) = (bytes(30_000, 11), bytes(20_000, 12));
    let archive = toy_archive(&x, &y);
    let server = Server::start(vec![("toy.tar.gz".into(), archive.clone())], vec![], 1);
    let spec = archive_spec(vec![format!("{}toy.tar.gz", server.base)], &archive, &x, &y);
    let tmp = tempfile::tempdir().unwrap();
    let done = download::download(&spec, &network(tmp.path())).unwrap();
    assert!(done.iter().all(|(_, o)| *o == Outcome::Extracted));
    assert_eq!(
        std::fs::read(tmp.path().join("toyc/batches/x.bin")).unwrap(),
        x
    );
    assert_eq!(
        std::fs::read(tmp.path().join("toyc/batches/y.bin")).unwrap(),
        y
    );
    assert!(!tmp.path().join("toyc/other").exists());
    assert!(
        !tmp.path().join("toyc/toy.tar.gz").exists(),
        "the archive is removed after extraction"
    );
    assert!(part_files(tmp.path()).is_empty());
}

#[test]
fn mirror_archive_or_extracted_files() {
    let (x, y) = (bytes(3_000, 13), bytes(2_000, 14));
    let archive = toy_archive(&x, &y);
    let spec = archive_spec(vec![], &archive, &x, &y);

    // The archive in the mirror's root.
    let m1 = tempfile::tempdir().unwrap();
    std::fs::write(m1.path().join("toy.tar.gz"), &archive).unwrap();
    let t1 = tempfile::tempdir().unwrap();
    download::download(&spec, &mirror(t1.path(), m1.path())).unwrap();
    assert_eq!(
        std::fs::read(t1.path().join("toyc/batches/y.bin")).unwrap(),
        y
    );

    // Extracted files, nested layout DIR/<dataset>/<member_dir>/.
    let m2 = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(m2.path().join("toyc/batches")).unwrap();
    std::fs::write(m2.path().join("toyc/batches/x.bin"), &x).unwrap();
    std::fs::write(m2.path().join("toyc/batches/y.bin"), &y).unwrap();
    let t2 = tempfile::tempdir().unwrap();
    let done = download::download(&spec, &mirror(t2.path(), m2.path())).unwrap();
    assert!(done.iter().all(|(_, o)| *o == Outcome::CopiedFromMirror));
    assert_eq!(
        std::fs::read(t2.path().join("toyc/batches/x.bin")).unwrap(),
        x
    );

    // Extracted files, flat layout DIR/<member_dir>/.
    let m3 = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(m3.path().join("batches")).unwrap();
    std::fs::write(m3.path().join("batches/x.bin"), &x).unwrap();
    std::fs::write(m3.path().join("batches/y.bin"), &y).unwrap();
    let t3 = tempfile::tempdir().unwrap();
    download::download(&spec, &mirror(t3.path(), m3.path())).unwrap();
    assert_eq!(
        std::fs::read(t3.path().join("toyc/batches/y.bin")).unwrap(),
        y
    );

    // A corrupt archive: md5 mismatch, nothing extracted, no archive left.
    let m4 = tempfile::tempdir().unwrap();
    let mut bad = archive.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x55;
    std::fs::write(m4.path().join("toy.tar.gz"), &bad).unwrap();
    let t4 = tempfile::tempdir().unwrap();
    let msg = format!(
        "{:#}",
        download::download(&spec, &mirror(t4.path(), m4.path())).unwrap_err()
    );
    assert!(msg.contains("md5"), "{msg}");
    assert!(!t4.path().join("toyc/batches/x.bin").exists());
    assert!(!t4.path().join("toyc/toy.tar.gz").exists());
    assert!(part_files(t4.path()).is_empty());
}

#[test]
fn an_archive_without_a_wanted_member_is_an_error() {
    let (x, y) = (bytes(100, 15), bytes(100, 16));
    let archive = toy_archive(&x, &y);
    let mut spec = archive_spec(vec![], &archive, &x, &y);
    if let Payload::Archive { files, .. } = &mut spec.payload {
        files.push(FileSpec {
            name: "w.bin".into(),
            size: 1,
            sha256: sha256(b"w"),
            remote: None,
        });
    }
    let m = tempfile::tempdir().unwrap();
    std::fs::write(m.path().join("toy.tar.gz"), &archive).unwrap();
    let t = tempfile::tempdir().unwrap();
    let msg = format!(
        "{:#}",
        download::download(&spec, &mirror(t.path(), m.path())).unwrap_err()
    );
    assert!(msg.contains("lacks batches/w.bin"), "{msg}");
}

#[test]
fn embedded_specs_match_the_published_checksums() {
    // Spot checks against shared/datasets/README.md, so a typo in the table
    // is caught without a download.
    let mnist = download::mnist_spec();
    let Payload::Files { files, base_urls } = &mnist.payload else {
        panic!("MNIST is separate files");
    };
    assert!(base_urls.iter().any(|u| u.contains("yann.lecun.com")));
    assert_eq!(files.len(), 4);
    assert_eq!(
        files[0].sha256,
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"
    );
    let cifar = download::cifar10_spec();
    let Payload::Archive {
        archive_md5, files, ..
    } = &cifar.payload
    else {
        panic!("CIFAR-10 is an archive");
    };
    assert_eq!(archive_md5, "c32a1d4ab5d03f1284b67883e8d87530");
    assert_eq!(files.len(), 8);
    assert!(files.iter().all(|f| f.sha256.len() == 64));
}
