//! Finds the shared library of a runtime-linked backend (ONNX Runtime, OpenVINO): the path in
//! the node's configuration, else an environment variable, else the library inside the pip
//! package that ships it. Every miss says where it looked, for `tensorlet status`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Where one backend's library may be.
pub struct LibrarySearch<'a> {
    /// `[nn]` key, for messages (`onnxruntime_library`).
    pub config_key: &'a str,
    pub configured: Option<&'a Path>,
    pub env_var: &'a str,
    /// The pip package carrying the library (`onnxruntime`).
    pub python_package: &'a str,
    /// Its folder inside the package (`capi`).
    pub package_dir: &'a str,
    /// The start of the library's file name (`libonnxruntime.so`).
    pub file_prefix: &'a str,
}

impl LibrarySearch<'_> {
    /// The library's path, or why none was found.
    pub fn find(&self) -> Result<PathBuf, String> {
        if let Some(path) = self.configured {
            return existing(path, &format!("[nn] {}", self.config_key));
        }
        if let Some(path) = std::env::var_os(self.env_var).filter(|p| !p.is_empty()) {
            return existing(Path::new(&path), &format!("${}", self.env_var));
        }
        let package = python_package_dir(self.python_package).ok_or_else(|| {
            format!(
                "library not found: set [nn] {} or ${}, or `pip install {}`",
                self.config_key, self.env_var, self.python_package
            )
        })?;
        let dir = package.join(self.package_dir);
        let mut candidates: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(|e| format!("cannot read {}: {e}", dir.display()))?
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .filter(|path| {
                path.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(self.file_prefix))
            })
            .collect();
        candidates.sort();
        candidates.pop().ok_or_else(|| {
            format!(
                "the pip package {} has no {}* in {}",
                self.python_package,
                self.file_prefix,
                dir.display()
            )
        })
    }
}

fn existing(path: &Path, source: &str) -> Result<PathBuf, String> {
    if path.is_file() {
        Ok(path.to_path_buf())
    } else {
        Err(format!(
            "{source} names {}, which does not exist",
            path.display()
        ))
    }
}

/// The folder of an installed Python package, found without importing it.
fn python_package_dir(package: &str) -> Option<PathBuf> {
    let script = "import importlib.util, sys\nspec = importlib.util.find_spec(sys.argv[1])\nprint(spec.submodule_search_locations[0] if spec and spec.submodule_search_locations else '')";
    let output = Command::new("python3")
        // Isolated (-I): no PYTHONPATH, user site or current directory can plant a package.
        .args(["-I", "-c", script, package])
        .output()
        .ok()?;
    let dir = String::from_utf8(output.stdout).ok()?.trim().to_string();
    (output.status.success() && !dir.is_empty()).then(|| PathBuf::from(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn search<'a>(configured: Option<&'a Path>) -> LibrarySearch<'a> {
        LibrarySearch {
            config_key: "example_library",
            configured,
            env_var: "TENSORLET_TEST_NO_SUCH_VARIABLE",
            python_package: "tensorlet_no_such_package",
            package_dir: "lib",
            file_prefix: "libexample.so",
        }
    }

    #[test]
    fn a_configured_path_wins_and_a_missing_one_says_where_it_came_from() {
        let dir = tempfile::tempdir().unwrap();
        let library = dir.path().join("libexample.so.1");
        std::fs::write(&library, b"").unwrap();
        assert_eq!(search(Some(&library)).find().unwrap(), library);
        let missing = dir.path().join("nothing.so");
        let error = search(Some(&missing)).find().unwrap_err();
        assert!(
            error.contains("[nn] example_library") && error.contains("does not exist"),
            "{error}"
        );
        let error = search(None).find().unwrap_err();
        assert!(
            error.contains("pip install tensorlet_no_such_package"),
            "{error}"
        );
    }
}
