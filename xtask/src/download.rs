//! `cargo xtask download`: fetch MNIST and CIFAR-10 into `datasets/`.
//!
//! Every file is checked against the checksum its publisher gave (embedded
//! below, copied from `shared/datasets/README.md`): MNIST's four `.gz` files by
//! sha256, the CIFAR-10 archive by its published md5 and each extracted batch
//! file by sha256. A file only ever appears under its final name after its
//! checksum matched: bytes go to `<name>.part` first, then a rename. A
//! mismatch is an error, removes the `.part`, and leaves nothing under the
//! final name.
//!
//! Sources, tried in order:
//! 1. a mirror folder (`--mirror DIR` or `QGRAD_MIRROR`), used *instead of* the
//!    network: machines without internet get the files from there;
//! 2. otherwise the canonical URLs, with a list of fallbacks for MNIST because
//!    the original page often answers 403. An interrupted download resumes from
//!    its `.part` with an HTTP `Range` request.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use md5::Md5;
use sha2::{Digest, Sha256};

/// Environment variable naming a mirror folder, like `--mirror`.
pub const MIRROR_ENV: &str = "QGRAD_MIRROR";

/// One file of a dataset as its publisher distributes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSpec {
    pub name: String,
    pub size: u64,
    /// Lower-case hex.
    pub sha256: String,
    /// The file's name on the servers, where it differs from `name`.
    pub remote: Option<String>,
}

/// How a dataset is distributed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// Separate files, each fetched as `<base_url><name>` from the first base
    /// URL that serves it with the right checksum.
    Files {
        base_urls: Vec<String>,
        files: Vec<FileSpec>,
    },
    /// One `.tar.gz` archive; the files under `member_dir/` inside it are
    /// extracted to `<dataset dir>/<member_dir>/`.
    Archive {
        urls: Vec<String>,
        archive_name: String,
        archive_size: u64,
        /// Lower-case hex md5 of the archive (the checksum its publisher gives).
        archive_md5: String,
        member_dir: String,
        files: Vec<FileSpec>,
    },
}

/// A downloadable dataset: its id on the command line, the folder under the
/// data dir, and its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetSpec {
    pub id: String,
    pub dir: String,
    pub payload: Payload,
}

impl DatasetSpec {
    /// Where the files of this dataset end up, in payload order.
    pub fn final_paths(&self, data_dir: &Path) -> Vec<PathBuf> {
        let root = data_dir.join(&self.dir);
        match &self.payload {
            Payload::Files { files, .. } => files.iter().map(|f| root.join(&f.name)).collect(),
            Payload::Archive {
                member_dir, files, ..
            } => files
                .iter()
                .map(|f| root.join(member_dir).join(&f.name))
                .collect(),
        }
    }
}

fn file(name: &str, size: u64, sha256: &str) -> FileSpec {
    FileSpec {
        name: name.to_string(),
        size,
        sha256: sha256.to_string(),
        remote: None,
    }
}

/// MNIST: the four gzip'd IDX files (checksums: `shared/datasets/README.md`).
pub fn mnist_spec() -> DatasetSpec {
    DatasetSpec {
        id: "mnist".into(),
        dir: "mnist".into(),
        payload: Payload::Files {
            base_urls: vec![
                // The original page (often 403 for scripted clients), then the
                // mirrors torchvision and TensorFlow use.
                "http://yann.lecun.com/exdb/mnist/".into(),
                "https://ossci-datasets.s3.amazonaws.com/mnist/".into(),
                "https://storage.googleapis.com/cvdf-datasets/mnist/".into(),
            ],
            files: vec![
                file(
                    "train-images-idx3-ubyte.gz",
                    9_912_422,
                    "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
                ),
                file(
                    "train-labels-idx1-ubyte.gz",
                    28_881,
                    "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
                ),
                file(
                    "t10k-images-idx3-ubyte.gz",
                    1_648_877,
                    "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
                ),
                file(
                    "t10k-labels-idx1-ubyte.gz",
                    4_542,
                    "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
                ),
            ],
        },
    }
}

/// CIFAR-10, binary version: one archive, `cifar-10-batches-bin/` extracted.
pub fn cifar10_spec() -> DatasetSpec {
    let batch = |name: &str, sha: &str| file(name, 30_730_000, sha);
    DatasetSpec {
        id: "cifar10".into(),
        dir: "cifar10".into(),
        payload: Payload::Archive {
            urls: vec!["https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz".into()],
            archive_name: "cifar-10-binary.tar.gz".into(),
            archive_size: 170_052_171,
            archive_md5: "c32a1d4ab5d03f1284b67883e8d87530".into(),
            member_dir: "cifar-10-batches-bin".into(),
            files: vec![
                batch(
                    "data_batch_1.bin",
                    "cee916563c9f80d84e3cc88e17fdc0941787f1244f00a67874d45b261883ada5",
                ),
                batch(
                    "data_batch_2.bin",
                    "a591ca11fa1708a91ee40f54b3da4784ccd871ecf2137de63f51ada8b3fa57ed",
                ),
                batch(
                    "data_batch_3.bin",
                    "bbe8596564c0f86427f876058170b84dac6670ddf06d79402899d93ceea26f67",
                ),
                batch(
                    "data_batch_4.bin",
                    "014e562d6e23c72197cc727519169a60359f5eccd8945ad5a09d710285ff4e48",
                ),
                batch(
                    "data_batch_5.bin",
                    "755304fc0b379caeae8c14f0dac912fbc7d6cd469eb67a1029a08a39453a9add",
                ),
                batch(
                    "test_batch.bin",
                    "8e2eb146ae340b09e24670f29cabc6326dba54da8789dab6768acf480273f65b",
                ),
                file(
                    "batches.meta.txt",
                    61,
                    "558e74b5e208382e186da55784b4bac2cd52e558448e1b5800990fdb28ed8033",
                ),
                file(
                    "readme.html",
                    88,
                    "4d1c3fb199d6a183ae03f5162b469d7bc04edf2fad9547bd5f224271d52f98e5",
                ),
            ],
        },
    }
}

/// War and Peace, the character-LSTM corpus (METHOD §11): one text file,
/// `war-and-peace/input.txt` (checksum: `shared/datasets/README.md`), from
/// the char-rnn data page.
pub fn war_and_peace_spec() -> DatasetSpec {
    DatasetSpec {
        id: "war-and-peace".into(),
        dir: "war-and-peace".into(),
        payload: Payload::Files {
            base_urls: vec!["https://cs.stanford.edu/people/karpathy/char-rnn/".into()],
            files: vec![FileSpec {
                remote: Some("warpeace_input.txt".into()),
                ..file(
                    "input.txt",
                    3_258_246,
                    "fb66ba999dafe24017cdd59e04c56d385a9c8466993d374fd4c6f08b2142985e",
                )
            }],
        },
    }
}

/// The datasets `download all` fetches.
pub fn all_specs() -> Vec<DatasetSpec> {
    vec![mnist_spec(), cifar10_spec(), war_and_peace_spec()]
}

/// Where the bytes come from.
#[derive(Debug, Clone)]
pub enum Source {
    Network,
    Mirror(PathBuf),
}

#[derive(Debug, Clone)]
pub struct DownloadOptions {
    pub data_dir: PathBuf,
    pub source: Source,
    /// Show progress bars (they also hide themselves when stderr is no terminal).
    pub progress: bool,
    /// Fetch again files that exist but fail their checksum (otherwise that is
    /// an error: the file is not ours to delete).
    pub force: bool,
}

/// What happened to one final file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It was there already with the right checksum.
    AlreadyPresent,
    CopiedFromMirror,
    Downloaded,
    /// Extracted from the archive (downloaded or found in the mirror).
    Extracted,
}

/// Makes sure every file of `spec` is under `options.data_dir` with the right
/// checksum. Returns the final paths and what was done for each.
pub fn download(spec: &DatasetSpec, options: &DownloadOptions) -> Result<Vec<(PathBuf, Outcome)>> {
    let root = options.data_dir.join(&spec.dir);
    match &spec.payload {
        Payload::Files { base_urls, files } => {
            let mut done = Vec::new();
            for f in files {
                let dest = root.join(&f.name);
                let outcome = fetch_single(spec, f, base_urls, &dest, options)?;
                done.push((dest, outcome));
            }
            Ok(done)
        }
        Payload::Archive {
            urls,
            archive_name,
            archive_size,
            archive_md5,
            member_dir,
            files,
        } => {
            let target_dir = root.join(member_dir);
            let mut missing = Vec::new();
            let mut done = Vec::new();
            for f in files {
                let dest = target_dir.join(&f.name);
                if existing_ok(&dest, f, options.force)? {
                    done.push((dest, Outcome::AlreadyPresent));
                } else {
                    missing.push(f.clone());
                }
            }
            if missing.is_empty() {
                return Ok(done);
            }
            // Prefer extracted files in a mirror; fall back to the mirror's or
            // the network's archive.
            if let Source::Mirror(mirror) = &options.source {
                let candidates = |name: &str| {
                    vec![
                        mirror.join(&spec.dir).join(member_dir).join(name),
                        mirror.join(member_dir).join(name),
                    ]
                };
                if missing
                    .iter()
                    .all(|f| candidates(&f.name).iter().any(|p| p.is_file()))
                {
                    for f in &missing {
                        let src = candidates(&f.name)
                            .into_iter()
                            .find(|p| p.is_file())
                            .expect("checked above that one candidate exists");
                        let dest = target_dir.join(&f.name);
                        copy_verified(&src, &dest, f, options.progress)?;
                        done.push((dest, Outcome::CopiedFromMirror));
                    }
                    return Ok(done);
                }
            }
            let archive_path = root.join(archive_name);
            let archive_spec = ArchiveCheck {
                name: archive_name,
                size: *archive_size,
                md5: archive_md5,
            };
            match &options.source {
                Source::Mirror(mirror) => {
                    let candidates = [
                        mirror.join(&spec.dir).join(archive_name),
                        mirror.join(archive_name),
                    ];
                    let Some(src) = candidates.iter().find(|p| p.is_file()) else {
                        bail!(
                            "the mirror {} has neither the extracted {} files ({}/{}/… or {}/…) nor the archive {} ({} or {})",
                            mirror.display(),
                            spec.id,
                            spec.dir,
                            member_dir,
                            member_dir,
                            archive_name,
                            candidates[0].display(),
                            candidates[1].display()
                        );
                    };
                    copy_archive_verified(src, &archive_path, &archive_spec, options.progress)?;
                }
                Source::Network => {
                    fetch_archive(spec, urls, &archive_path, &archive_spec, options)?;
                }
            }
            extract_members(&archive_path, member_dir, &missing, &target_dir)?;
            fs::remove_file(&archive_path)
                .with_context(|| format!("removing {}", archive_path.display()))?;
            for f in &missing {
                done.push((target_dir.join(&f.name), Outcome::Extracted));
            }
            Ok(done)
        }
    }
}

struct ArchiveCheck<'a> {
    name: &'a str,
    size: u64,
    md5: &'a str,
}

/// `true` if `dest` exists with the right checksum; `false` if it is absent
/// (or present but wrong and `force` is set); an error if it is wrong and
/// `force` is not set.
fn existing_ok(dest: &Path, f: &FileSpec, force: bool) -> Result<bool> {
    if !dest.exists() {
        return Ok(false);
    }
    let got = sha256_file(dest)?;
    if got == f.sha256 {
        return Ok(true);
    }
    if force {
        eprintln!(
            "{} has sha256 {got}, expected {}: fetching it again (--force)",
            dest.display(),
            f.sha256
        );
        fs::remove_file(dest).with_context(|| format!("removing {}", dest.display()))?;
        return Ok(false);
    }
    bail!(
        "{} exists but its sha256 is {got}, expected {}: delete it or rerun with --force",
        dest.display(),
        f.sha256
    )
}

fn fetch_single(
    spec: &DatasetSpec,
    f: &FileSpec,
    base_urls: &[String],
    dest: &Path,
    options: &DownloadOptions,
) -> Result<Outcome> {
    if existing_ok(dest, f, options.force)? {
        return Ok(Outcome::AlreadyPresent);
    }
    match &options.source {
        Source::Mirror(mirror) => {
            let candidates = [mirror.join(&spec.dir).join(&f.name), mirror.join(&f.name)];
            let Some(src) = candidates.iter().find(|p| p.is_file()) else {
                bail!(
                    "{} is not in the mirror {} (looked for {} and {})",
                    f.name,
                    mirror.display(),
                    candidates[0].display(),
                    candidates[1].display()
                );
            };
            copy_verified(src, dest, f, options.progress)?;
            Ok(Outcome::CopiedFromMirror)
        }
        Source::Network => {
            let agent = agent();
            let part = part_path(dest);
            let mut failures = Vec::new();
            for base in base_urls {
                let url = format!("{base}{}", f.remote.as_deref().unwrap_or(&f.name));
                match fetch_url(&agent, &url, &part, Some(f.size), options.progress) {
                    Ok(()) => {}
                    Err(e) => {
                        failures.push(format!("{url}: {e:#}"));
                        continue;
                    }
                }
                let got = sha256_file(&part)?;
                if got == f.sha256 {
                    rename(&part, dest)?;
                    return Ok(Outcome::Downloaded);
                }
                // Corrupt bytes: never resume from them.
                remove_if_exists(&part)?;
                failures.push(format!(
                    "{url}: checksum mismatch (sha256 {got}, expected {})",
                    f.sha256
                ));
            }
            Err(network_failure(&f.name, &failures))
        }
    }
}

fn fetch_archive(
    spec: &DatasetSpec,
    urls: &[String],
    archive_path: &Path,
    check: &ArchiveCheck,
    options: &DownloadOptions,
) -> Result<()> {
    let agent = agent();
    let part = part_path(archive_path);
    let mut failures = Vec::new();
    for url in urls {
        if let Err(e) = fetch_url(&agent, url, &part, Some(check.size), options.progress) {
            failures.push(format!("{url}: {e:#}"));
            continue;
        }
        let got = md5_file(&part)?;
        if got == check.md5 {
            rename(&part, archive_path)?;
            return Ok(());
        }
        remove_if_exists(&part)?;
        failures.push(format!(
            "{url}: checksum mismatch (md5 {got}, expected {})",
            check.md5
        ));
    }
    Err(network_failure(
        &format!("{} ({})", check.name, spec.id),
        &failures,
    ))
}

fn network_failure(what: &str, failures: &[String]) -> anyhow::Error {
    anyhow!(
        "could not download {what} from any source:\n  {}\n\
         Machines without internet access can use a local copy instead: \
         --mirror DIR (or the environment variable {MIRROR_ENV}=DIR), \
         e.g. `cargo xtask download all --mirror ../shared/datasets`",
        failures.join("\n  ")
    )
}

/// An HTTP agent with bounded waits, that lets us see every status code
/// (206/200/416 all matter for resuming).
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(20)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        .timeout_per_read(Some(Duration::from_secs(60)))
        .build()
        .into()
}

/// `<dest>.part`.
pub fn part_path(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".part");
    dest.with_file_name(name)
}

/// Downloads `url` into `part`, continuing from the bytes already in `part`
/// with a `Range` request. Does not check the content (the caller does); does
/// check the length when `expected_size` is known.
pub fn fetch_url(
    agent: &ureq::Agent,
    url: &str,
    part: &Path,
    expected_size: Option<u64>,
    progress: bool,
) -> Result<()> {
    if let Some(parent) = part.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let mut offset = match fs::metadata(part) {
        Ok(m) => m.len(),
        Err(_) => 0,
    };
    if let Some(size) = expected_size {
        if offset == size {
            return Ok(()); // complete already; the checksum decides
        }
        if offset > size {
            offset = 0; // longer than the real file: cannot be a prefix of it
        }
    }
    let mut request = agent.get(url).header("Accept-Encoding", "identity");
    if offset > 0 {
        request = request.header("Range", format!("bytes={offset}-"));
    }
    let mut response = request.call().map_err(|e| anyhow!("{e}"))?;
    let status = response.status().as_u16();
    match status {
        206 => {
            // Only trust the server if it continues exactly where we stopped.
            let content_range = response
                .headers()
                .get("content-range")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let expected_prefix = format!("bytes {offset}-");
            if !content_range.starts_with(&expected_prefix) {
                bail!("the server answered the range request with Content-Range {content_range:?}, expected one starting {expected_prefix:?}");
            }
        }
        200 => offset = 0, // the server ignored the range: start over
        416 if offset > 0 => {
            // Our partial file does not fit this resource: start over.
            fs::remove_file(part).with_context(|| format!("removing {}", part.display()))?;
            return fetch_url(agent, url, part, expected_size, progress);
        }
        _ => bail!("HTTP status {status}"),
    }
    let total = expected_size.or_else(|| {
        response
            .body()
            .content_length()
            .map(|len| len + if status == 206 { offset } else { 0 })
    });
    let mut out = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(part)
        .with_context(|| format!("opening {}", part.display()))?;
    out.set_len(offset)
        .with_context(|| format!("truncating {}", part.display()))?;
    out.seek(SeekFrom::Start(offset))?;
    let bar = bytes_bar(total, progress, url);
    bar.set_position(offset);
    let mut reader = response.body_mut().as_reader();
    let mut buf = vec![0u8; 1 << 16];
    let mut written = offset;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                bar.abandon();
                out.flush().ok();
                return Err(anyhow!(
                    "connection lost after {written} bytes ({e}); rerun to resume from {}",
                    part.display()
                ));
            }
        };
        out.write_all(&buf[..n])
            .with_context(|| format!("writing {}", part.display()))?;
        written += n as u64;
        if let Some(size) = expected_size {
            if written > size {
                bar.abandon();
                bail!("the server sent more than the expected {size} bytes");
            }
        }
        bar.set_position(written);
    }
    out.sync_all()
        .with_context(|| format!("syncing {}", part.display()))?;
    bar.finish_and_clear();
    if let Some(size) = expected_size {
        if written != size {
            bail!(
                "incomplete download: {written} of {size} bytes; rerun to resume from {}",
                part.display()
            );
        }
    }
    Ok(())
}

fn bytes_bar(total: Option<u64>, progress: bool, label: &str) -> ProgressBar {
    if !progress {
        return ProgressBar::hidden();
    }
    let bar = match total {
        Some(t) => ProgressBar::new(t),
        None => ProgressBar::no_length(),
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("static template is valid")
        .progress_chars("=> "),
    );
    bar.set_message(label.to_string());
    bar
}

/// Copies `src` to `dest` via `dest.part`, hashing on the way; renames only
/// when the sha256 matches.
fn copy_verified(src: &Path, dest: &Path, f: &FileSpec, progress: bool) -> Result<()> {
    let part = part_path(dest);
    let got = copy_hashing::<Sha256>(src, &part, progress)?;
    if got != f.sha256 {
        remove_if_exists(&part)?;
        bail!(
            "checksum mismatch for {}: sha256 {got}, expected {}; nothing was written to {}",
            src.display(),
            f.sha256,
            dest.display()
        );
    }
    rename(&part, dest)
}

fn copy_archive_verified(
    src: &Path,
    dest: &Path,
    check: &ArchiveCheck,
    progress: bool,
) -> Result<()> {
    let part = part_path(dest);
    let got = copy_hashing::<Md5>(src, &part, progress)?;
    if got != check.md5 {
        remove_if_exists(&part)?;
        bail!(
            "checksum mismatch for {}: md5 {got}, expected {}",
            src.display(),
            check.md5
        );
    }
    rename(&part, dest)
}

fn copy_hashing<D: Digest>(src: &Path, dest: &Path, progress: bool) -> Result<String> {
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let mut input = File::open(src).with_context(|| format!("opening {}", src.display()))?;
    let len = input.metadata().map(|m| m.len()).ok();
    let mut output = File::create(dest).with_context(|| format!("creating {}", dest.display()))?;
    let bar = bytes_bar(len, progress, &src.display().to_string());
    let mut hasher = D::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = input
            .read(&mut buf)
            .with_context(|| format!("reading {}", src.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        output
            .write_all(&buf[..n])
            .with_context(|| format!("writing {}", dest.display()))?;
        bar.inc(n as u64);
    }
    output
        .sync_all()
        .with_context(|| format!("syncing {}", dest.display()))?;
    bar.finish_and_clear();
    Ok(hex(&hasher.finalize()))
}

/// Extracts the `wanted` files under `member_dir/` of a `.tar.gz` into
/// `target_dir`, each verified by sha256 before it gets its final name.
fn extract_members(
    archive: &Path,
    member_dir: &str,
    wanted: &[FileSpec],
    target_dir: &Path,
) -> Result<()> {
    fs::create_dir_all(target_dir).with_context(|| format!("creating {}", target_dir.display()))?;
    let gz = flate2::read::GzDecoder::new(
        File::open(archive).with_context(|| format!("opening {}", archive.display()))?,
    );
    let mut tar = tar::Archive::new(gz);
    let mut found = vec![false; wanted.len()];
    for entry in tar
        .entries()
        .with_context(|| format!("reading the archive {}", archive.display()))?
    {
        let mut entry =
            entry.with_context(|| format!("reading the archive {}", archive.display()))?;
        let path = entry.path()?.into_owned();
        let mut parts = path
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned());
        let (Some(dir), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if dir != member_dir {
            continue;
        }
        let Some(i) = wanted.iter().position(|f| f.name == name) else {
            continue;
        };
        // We name the output ourselves (never the archive's path): no traversal.
        let dest = target_dir.join(&wanted[i].name);
        let part = part_path(&dest);
        let mut out =
            File::create(&part).with_context(|| format!("creating {}", part.display()))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = entry
                .read(&mut buf)
                .with_context(|| format!("extracting {name} from {}", archive.display()))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])?;
        }
        out.sync_all()?;
        let got = hex(&hasher.finalize());
        if got != wanted[i].sha256 {
            remove_if_exists(&part)?;
            bail!(
                "checksum mismatch for {name} extracted from {}: sha256 {got}, expected {}",
                archive.display(),
                wanted[i].sha256
            );
        }
        rename(&part, &dest)?;
        found[i] = true;
    }
    let missing: Vec<&str> = wanted
        .iter()
        .zip(&found)
        .filter(|(_, ok)| !**ok)
        .map(|(f, _)| f.name.as_str())
        .collect();
    if !missing.is_empty() {
        bail!(
            "the archive {} lacks {member_dir}/{}",
            archive.display(),
            missing.join(", ")
        );
    }
    Ok(())
}

fn rename(from: &Path, to: &Path) -> Result<()> {
    fs::rename(from, to).with_context(|| format!("renaming {} to {}", from.display(), to.display()))
}

fn remove_if_exists(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

/// Lower-case hex sha256 of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
    hash_file::<Sha256>(path)
}

/// Lower-case hex md5 of a file.
pub fn md5_file(path: &Path) -> Result<String> {
    hash_file::<Md5>(path)
}

fn hash_file<D: Digest>(path: &Path) -> Result<String> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = D::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
