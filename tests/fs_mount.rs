//! The file system mounted with FUSE by `lab fs mount` processes (two, as
//! separate workstations) on a volume served in this process: coherence
//! against an in-memory model over 1,000 seeded operations, and real tools
//! (git, tar, cp -r) on a mount. Needs root and /dev/fuse.

use common::rng::SimRng;
use lab::fs::FsServer;
use lab::fs_crash::MountProcess;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use storage_node::DiskBackend;

/// A `lab fs mount` process; dropping it unmounts (SIGTERM, then force).
struct Mount(MountProcess);

impl Mount {
    fn start(volume_file: &Path, dir: &Path, workstation: u32) -> Mount {
        let lab = Path::new(env!("CARGO_BIN_EXE_lab"));
        Mount(MountProcess::start(lab, volume_file, dir, workstation).expect("mounted (root and /dev/fuse are needed)"))
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.0.dir.join(relative)
    }
}

struct Served {
    _server: FsServer,
    _runtime: tokio::runtime::Runtime,
    directory: tempfile::TempDir,
    volume_file: PathBuf,
}

fn serve() -> Served {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let server = runtime.block_on(FsServer::start(None, DiskBackend::Memory, 1000)).expect("serve a volume");
    let directory = tempfile::tempdir().expect("temp dir");
    let volume_file = directory.path().join("volume.json");
    server.volume.write(&volume_file).expect("volume file");
    Served { _server: server, _runtime: runtime, directory, volume_file }
}

impl Served {
    fn mount(&self, name: &str, workstation: u32) -> Mount {
        Mount::start(&self.volume_file, &self.directory.path().join(name), workstation)
    }

    fn fsck(&self) -> String {
        let output = Command::new(env!("CARGO_BIN_EXE_lab"))
            .args(["fs", "fsck", "--volume"])
            .arg(&self.volume_file)
            .output()
            .expect("run lab fs fsck");
        let text = String::from_utf8_lossy(&output.stdout).to_string();
        assert!(output.status.success(), "fsck found problems:\n{text}{}", String::from_utf8_lossy(&output.stderr));
        text
    }
}

/// What the file system should hold: directories and files by path.
#[derive(Default)]
struct Model {
    directories: BTreeSet<String>,
    files: BTreeMap<String, Vec<u8>>,
}

impl Model {
    fn children(&self, directory: &str) -> BTreeSet<String> {
        let prefix = if directory.is_empty() { String::new() } else { format!("{directory}/") };
        let direct = |path: &String| {
            path.strip_prefix(&prefix).filter(|rest| !rest.is_empty() && !rest.contains('/')).map(str::to_string)
        };
        self.directories.iter().chain(self.files.keys()).filter_map(direct).collect()
    }
}

#[test]
fn two_mounts_agree_with_a_model_over_a_thousand_operations() {
    let served = serve();
    let mounts = [served.mount("a", 0), served.mount("b", 1)];
    let mut model = Model::default();
    let mut rng = SimRng::new(20261123);
    let directories = ["", "d0", "d1", "d0/e"];
    let mut counts: BTreeMap<&str, u32> = BTreeMap::new();
    for step in 0..1000 {
        let mount = &mounts[rng.below(2) as usize];
        let other = &mounts[rng.below(2) as usize];
        let directory = directories[rng.below(directories.len() as u64) as usize];
        let name = format!("f{}", rng.below(12));
        let path = if directory.is_empty() { name.clone() } else { format!("{directory}/{name}") };
        let directory_exists = directory.is_empty() || model.directories.contains(directory);
        let kind = rng.below(100);
        let what = match kind {
            0..=29 => {
                let length = [0, 1, 100, 4096, 5000, 70_000][rng.below(6) as usize];
                let data: Vec<u8> = (0..length).map(|_| rng.below(256) as u8).collect();
                let result = std::fs::write(mount.path(&path), &data);
                assert_eq!(result.is_ok(), directory_exists, "step {step}: write {path}: {result:?}");
                if result.is_ok() {
                    model.files.insert(path.clone(), data);
                }
                "write"
            }
            30..=54 => {
                let result = std::fs::read(other.path(&path));
                match model.files.get(&path) {
                    Some(expected) => {
                        let read = result.unwrap_or_else(|error| panic!("step {step}: read {path}: {error}"));
                        assert!(
                            read == *expected,
                            "step {step}: {path} read {} bytes, expected {}",
                            read.len(),
                            expected.len()
                        );
                    }
                    None => assert!(result.is_err(), "step {step}: {path} should not exist"),
                }
                "read"
            }
            55..=62 => {
                let appended: Vec<u8> = (0..rng.below(3000)).map(|_| rng.below(256) as u8).collect();
                let result = std::fs::OpenOptions::new().append(true).open(mount.path(&path));
                match (result, model.files.get_mut(&path)) {
                    (Ok(mut file), Some(content)) => {
                        file.write_all(&appended).expect("append");
                        content.extend_from_slice(&appended);
                    }
                    (Err(_), None) => {}
                    (result, expected) => {
                        panic!("step {step}: append {path}: {result:?}, exists {}", expected.is_some())
                    }
                }
                "append"
            }
            63..=72 => {
                let result = std::fs::remove_file(mount.path(&path));
                assert_eq!(
                    result.is_ok(),
                    model.files.remove(&path).is_some(),
                    "step {step}: unlink {path}: {result:?}"
                );
                "unlink"
            }
            73..=82 => {
                let target_directory = directories[rng.below(directories.len() as u64) as usize];
                let target_name = format!("f{}", rng.below(12));
                let target =
                    if target_directory.is_empty() { target_name } else { format!("{target_directory}/{target_name}") };
                let target_ok = target_directory.is_empty() || model.directories.contains(target_directory);
                let result = std::fs::rename(mount.path(&path), mount.path(&target));
                let expected = model.files.contains_key(&path) && target_ok;
                assert_eq!(result.is_ok(), expected, "step {step}: rename {path} -> {target}: {result:?}");
                if expected {
                    let content = model.files.remove(&path).expect("present");
                    model.files.insert(target, content);
                }
                "rename"
            }
            83..=88 => {
                let parent_ok = match directory.rsplit_once('/') {
                    Some((parent, _)) => model.directories.contains(parent),
                    None => true,
                };
                if !directory.is_empty() {
                    let result = std::fs::create_dir(mount.path(directory));
                    let expected = parent_ok && !model.directories.contains(directory);
                    assert_eq!(result.is_ok(), expected, "step {step}: mkdir {directory}: {result:?}");
                    if expected {
                        model.directories.insert(directory.to_string());
                    }
                }
                "mkdir"
            }
            89..=92 => {
                if !directory.is_empty() {
                    let result = std::fs::remove_dir(mount.path(directory));
                    let expected = model.directories.contains(directory) && model.children(directory).is_empty();
                    assert_eq!(result.is_ok(), expected, "step {step}: rmdir {directory}: {result:?}");
                    if expected {
                        model.directories.remove(directory);
                    }
                }
                "rmdir"
            }
            _ => {
                if directory_exists {
                    let listed: BTreeSet<String> = std::fs::read_dir(other.path(directory))
                        .unwrap_or_else(|error| panic!("step {step}: list {directory}: {error}"))
                        .map(|entry| entry.expect("entry").file_name().to_string_lossy().to_string())
                        .collect();
                    assert_eq!(listed, model.children(directory), "step {step}: list {directory:?}");
                    for (path, content) in &model.files {
                        if path.starts_with(directory) {
                            let length = std::fs::metadata(other.path(path)).expect("stat").len();
                            assert_eq!(length, content.len() as u64, "step {step}: size of {path}");
                        }
                    }
                }
                "list"
            }
        };
        *counts.entry(what).or_default() += 1;
    }
    println!("operations: {counts:?}; {} files, {} directories at the end", model.files.len(), model.directories.len());
    drop(mounts);
    let report = served.fsck();
    assert!(report.contains("clean"), "{report}");
}

/// The kernel keeps names and attributes for a minute under the locks
/// that cover them; each change on one mount must drop the other's at
/// once (a missed release would show the old name, size or mode here).
#[test]
fn names_and_attributes_a_mount_cached_change_at_once_when_the_other_mount_changes_them() {
    use std::os::unix::fs::PermissionsExt;
    let served = serve();
    let (a, b) = (served.mount("a", 0), served.mount("b", 1));
    std::fs::create_dir(a.path("d")).expect("mkdir");
    std::fs::write(a.path("d/f"), b"first").expect("write");
    for round in 0..20u32 {
        let length = u64::from(round) * 100 + 7;
        // b looks twice (the second from its kernel's cache), then a changes.
        for _ in 0..2 {
            assert!(b.path("d/f").exists(), "round {round}: b sees d/f");
        }
        std::fs::write(a.path("d/f"), vec![b'x'; length as usize]).expect("rewrite");
        assert_eq!(std::fs::metadata(b.path("d/f")).expect("stat").len(), length, "round {round}: size on b");
        std::fs::set_permissions(a.path("d/f"), std::fs::Permissions::from_mode(0o600 + round % 2 * 0o40))
            .expect("chmod");
        let mode = std::fs::metadata(b.path("d/f")).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600 + round % 2 * 0o40, "round {round}: mode on b");
        std::fs::rename(a.path("d/f"), a.path("d/g")).expect("rename");
        assert!(!b.path("d/f").exists(), "round {round}: b still sees the old name");
        assert_eq!(std::fs::read(b.path("d/g")).expect("read the new name").len() as u64, length);
        // And the other way round: b renames back, a sees it.
        std::fs::rename(b.path("d/g"), b.path("d/f")).expect("rename back");
        assert!(!a.path("d/g").exists(), "round {round}: a still sees g");
        assert!(a.path("d/f").exists(), "round {round}: a sees f again");
    }
    // A name renamed into another directory is one of that directory's names.
    std::fs::create_dir(a.path("e")).expect("mkdir e");
    std::fs::write(a.path("d/x"), b"x").expect("write x");
    std::fs::rename(a.path("d/x"), a.path("e/y")).expect("rename across directories");
    assert!(a.path("e/y").exists());
    std::fs::rename(b.path("e/y"), b.path("e/z")).expect("rename on b");
    assert!(!a.path("e/y").exists(), "a still sees the name b renamed away");
    assert!(a.path("e/z").exists());
    std::fs::remove_file(b.path("d/f")).expect("unlink");
    assert!(!a.path("d/f").exists(), "a still sees the unlinked file");
    std::fs::remove_dir(a.path("d")).expect("rmdir");
    assert!(!b.path("d").exists(), "b still sees the removed directory");
    std::fs::remove_file(a.path("e/z")).expect("unlink z");
    std::fs::remove_dir(b.path("e")).expect("rmdir e");
    assert!(!a.path("e").exists(), "a still sees the removed directory e");
    drop((a, b));
    assert!(served.fsck().contains("clean"));
}

fn run(directory: &Path, program: &str, args: &[&str]) {
    let output = Command::new(program)
        .args(args)
        .current_dir(directory)
        .output()
        .unwrap_or_else(|error| panic!("{program}: {error}"));
    assert!(
        output.status.success(),
        "{program} {args:?} in {}: {}{}",
        directory.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn output(directory: &Path, program: &str, args: &[&str]) -> String {
    let output = Command::new(program).args(args).current_dir(directory).output().expect("run");
    assert!(output.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).to_string()
}

#[test]
fn git_tar_and_cp_work_on_a_mount() {
    let served = serve();
    let a = served.mount("a", 0);
    let b = served.mount("b", 1);
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("frangipani");

    // cp -r, checked from the other workstation.
    run(&a.0.dir, "cp", &["-r", &source.to_string_lossy(), "copy"]);
    run(&b.0.dir, "diff", &["-r", &source.to_string_lossy(), "copy"]);

    // git init, add, commit; the other workstation sees the commit.
    let git = ["-c", "user.name=lab", "-c", "user.email=lab@example.com"];
    run(&a.path("copy"), "git", &["init", "-q", "."]);
    run(&a.path("copy"), "git", &["add", "."]);
    run(&a.path("copy"), "git", &[&git[..], &["commit", "-q", "-m", "first"]].concat());
    let log = output(&b.path("copy"), "git", &["log", "--oneline"]);
    assert!(log.contains("first"), "{log}");
    run(&b.path("copy"), "git", &["fsck", "--strict"]);
    let status = output(&b.path("copy"), "git", &["status", "--porcelain"]);
    assert!(status.is_empty(), "the tree matches the commit: {status}");

    // tar c on one workstation, tar x on the other.
    run(&a.0.dir, "tar", &["cf", "copy.tar", "copy"]);
    std::fs::create_dir(b.path("unpacked")).expect("mkdir");
    run(&b.0.dir, "tar", &["xf", "copy.tar", "-C", "unpacked"]);
    run(&a.0.dir, "diff", &["-r", "copy", "unpacked/copy"]);
    drop((a, b));
    served.fsck();
}

#[test]
fn a_workstation_killed_mid_workload_loses_nothing_it_fsynced() {
    // `lab fs crash-test` runs 200 points; three here keep the suite short.
    let options = lab::fs_crash::CrashOptions { points: 3, seed: 42, operations_max: 30, lease_ms: 600, json: None };
    let report = lab::fs_crash::run(&options, Path::new(env!("CARGO_BIN_EXE_lab")), |_| {}).expect("crash test");
    assert_eq!(report.points.len(), 3);
    for point in &report.points {
        assert!(point.survived_prefix >= point.synced_operations, "{point:?}");
        assert!(point.fsck_problems.is_empty(), "{point:?}");
    }
}
