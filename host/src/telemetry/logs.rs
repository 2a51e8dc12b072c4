//! Structured per-app logs: the lines a guest writes to stdout and stderr or through
//! `wasi:logging`, each with its request id, revision and level, kept on disk as a bounded ring
//! per app and streamed to followers (`tensorlet logs <app> [--follow]`,
//! `GET /v1/admin/apps/<app>/logs`).
//!
//! Storage: the sled tree `logs`, key `<app>\0<seq as u64 big-endian>` → [`LogLine`] JSON.
//! App names are `[a-z0-9-]`, so the `\0` separator never occurs in a name and one app's keys
//! are a contiguous range, oldest first. Sequence numbers start at 1 and grow by one per line
//! of an app, across restarts (the writer recovers an app's last one from its newest key the
//! first time it sees the app).
//!
//! Writing never waits on the disk: [`AppLogs::append`] puts the line into a bounded queue,
//! or drops and counts it ([`AppLogs::dropped`]) when the queue is full. One writer thread
//! drains the queue in batches, numbers the lines, stores each batch with one sled batch
//! (trimming each app to its newest `max_lines_per_app` lines in the same batch) and then
//! hands the lines to the app's followers ([`AppLogs::subscribe`]).
//!
//! Logs are not made durable line by line: nothing here flushes, sled's own background flush
//! (about every half second) writes them out. A crash may lose the last second or so of
//! lines, by design; requests never wait for their logs.

use crate::store::{Store, StoreError};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use tokio::sync::{broadcast, mpsc, oneshot};

/// The longest message kept, in bytes; longer ones are cut on a character boundary.
pub const MAX_MESSAGE_BYTES: usize = 4096;
/// The most lines one [`AppLogs::read`] returns.
pub const MAX_READ_LINES: usize = 10_000;
/// Lines waiting for the writer; beyond this, new lines are dropped and counted.
pub const QUEUE_CAPACITY: usize = 8192;
/// Lines a follower may fall behind before it is told it lagged.
pub const FOLLOWER_CAPACITY: usize = 1024;
/// The most queued lines the writer stores in one sled batch.
const WRITE_BATCH: usize = 1024;

/// A `wasi:logging` level, least severe first (so levels compare for filtering).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
    Critical,
}

/// Where a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Stdout,
    Stderr,
    Logging,
}

/// One log line of one app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// Assigned by the store: 1 for an app's first line, then one more per line.
    pub seq: u64,
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    pub app: String,
    pub revision: u64,
    pub request_id: String,
    pub level: Level,
    pub source: Source,
    /// At most [`MAX_MESSAGE_BYTES`] once appended.
    pub message: String,
}

impl LogLine {
    /// A line stamped with the current time; its `seq` is assigned when it is stored.
    pub fn new(
        app: impl Into<String>,
        revision: u64,
        request_id: impl Into<String>,
        level: Level,
        source: Source,
        message: impl Into<String>,
    ) -> Self {
        Self {
            seq: 0,
            time_ms: unix_now_ms(),
            app: app.into(),
            revision,
            request_id: request_id.into(),
            level,
            source,
            message: message.into(),
        }
    }
}

/// The node's per-app logs; cheap to clone. The writer thread stops (after storing what is
/// queued) when the last handle is dropped, and dropping it waits for that.
#[derive(Clone)]
pub struct AppLogs {
    shared: Arc<Shared>,
}

struct Shared {
    tree: sled::Tree,
    /// `None` only while the last handle is being dropped.
    commands: Option<mpsc::Sender<Command>>,
    dropped: Arc<AtomicU64>,
    followers: Arc<Followers>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        drop(self.commands.take());
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// One broadcast channel per followed app; an app's channel is dropped once nobody follows it.
type Followers = Mutex<HashMap<String, broadcast::Sender<LogLine>>>;

enum Command {
    Append(LogLine),
    /// Answered once every command before it has been carried out.
    Flush(oneshot::Sender<()>),
    RemoveApp(String, oneshot::Sender<Result<(), StoreError>>),
}

impl AppLogs {
    /// Opens the `logs` tree of `store` and starts the writer thread. Each app keeps its newest
    /// `max_lines_per_app` lines (at least 1).
    pub fn open(store: &Store, max_lines_per_app: usize) -> Result<Self, StoreError> {
        let tree = store.tree("logs")?;
        let (commands, queue) = mpsc::channel(QUEUE_CAPACITY);
        let dropped = Arc::new(AtomicU64::new(0));
        let followers = Arc::new(Followers::default());
        let writer = Writer {
            tree: tree.clone(),
            max_lines_per_app: max_lines_per_app.max(1) as u64,
            next_seqs: HashMap::new(),
            followers: followers.clone(),
            dropped: dropped.clone(),
        };
        let writer = std::thread::Builder::new()
            .name("tensorlet-logs".into())
            .spawn(move || writer.run(queue))
            .map_err(|e| StoreError::Flush(format!("cannot start the log writer: {e}")))?;
        Ok(Self {
            shared: Arc::new(Shared {
                tree,
                commands: Some(commands),
                dropped,
                followers,
                writer: Some(writer),
            }),
        })
    }

    /// Queues a line for storage without waiting: its message is cut to
    /// [`MAX_MESSAGE_BYTES`], and when the queue is full the line is dropped and counted.
    pub fn append(&self, mut line: LogLine) {
        let cut = line.message.floor_char_boundary(MAX_MESSAGE_BYTES);
        line.message.truncate(cut);
        let queued = self
            .commands()
            .is_some_and(|commands| commands.try_send(Command::Append(line)).is_ok());
        if !queued {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Lines lost since [`open`](Self::open): dropped because the queue was full, or because
    /// the database refused them.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// The lines of `app` stored from now on, each once it is stored (with its `seq`). A
    /// follower more than [`FOLLOWER_CAPACITY`] lines behind gets
    /// [`broadcast::error::RecvError::Lagged`]; the channel closes when the app is removed.
    /// To follow without a gap, subscribe first, then [`read`](Self::read) the history and
    /// skip received lines whose `seq` it already covered.
    pub fn subscribe(&self, app: &str) -> broadcast::Receiver<LogLine> {
        let mut followers = lock(&self.shared.followers);
        match followers.get(app) {
            Some(sender) => sender.subscribe(),
            None => {
                let (sender, receiver) = broadcast::channel(FOLLOWER_CAPACITY);
                followers.insert(app.to_string(), sender);
                receiver
            }
        }
    }

    /// Stored lines of `app`, oldest first, at most `limit` (and at most [`MAX_READ_LINES`]):
    /// those after `after_seq` when given (`Some(0)` reads from the oldest), otherwise the
    /// newest ones (a tail).
    pub fn read(
        &self,
        app: &str,
        after_seq: Option<u64>,
        limit: usize,
    ) -> Result<Vec<LogLine>, StoreError> {
        let limit = limit.min(MAX_READ_LINES);
        let tree = &self.shared.tree;
        match after_seq {
            Some(after) => {
                let Some(first) = after.checked_add(1) else {
                    return Ok(Vec::new());
                };
                tree.range(line_key(app, first)..=line_key(app, u64::MAX))
                    .take(limit)
                    .map(decode_line)
                    .collect()
            }
            None => {
                let mut newest = tree
                    .scan_prefix(app_prefix(app))
                    .rev()
                    .take(limit)
                    .map(decode_line)
                    .collect::<Result<Vec<_>, _>>()?;
                newest.reverse();
                Ok(newest)
            }
        }
    }

    /// Deletes every line of `app`, including those still queued, and closes its followers'
    /// channels. A later line for the same name starts again at `seq` 1.
    pub async fn remove_app(&self, app: &str) -> Result<(), StoreError> {
        let (reply, outcome) = oneshot::channel();
        self.send(Command::RemoveApp(app.to_string(), reply))
            .await?;
        outcome.await.map_err(|_| writer_stopped())?
    }

    /// Returns once every line appended before this call is stored (not made durable: see the
    /// module's documentation). Waits for room in the queue if it is full.
    pub async fn flush_pending(&self) -> Result<(), StoreError> {
        let (reply, done) = oneshot::channel();
        self.send(Command::Flush(reply)).await?;
        done.await.map_err(|_| writer_stopped())
    }

    fn commands(&self) -> Option<&mpsc::Sender<Command>> {
        self.shared.commands.as_ref()
    }

    async fn send(&self, command: Command) -> Result<(), StoreError> {
        let commands = self.commands().ok_or_else(writer_stopped)?;
        commands.send(command).await.map_err(|_| writer_stopped())
    }
}

/// The writer thread's state.
struct Writer {
    tree: sled::Tree,
    max_lines_per_app: u64,
    /// The next `seq` of each app seen since start.
    next_seqs: HashMap<String, u64>,
    followers: Arc<Followers>,
    dropped: Arc<AtomicU64>,
}

impl Writer {
    fn run(mut self, mut queue: mpsc::Receiver<Command>) {
        let mut commands = Vec::with_capacity(WRITE_BATCH);
        let mut lines = Vec::with_capacity(WRITE_BATCH);
        while queue.blocking_recv_many(&mut commands, WRITE_BATCH) > 0 {
            for command in commands.drain(..) {
                match command {
                    Command::Append(line) => lines.push(line),
                    Command::Flush(reply) => {
                        self.store(&mut lines);
                        let _ = reply.send(());
                    }
                    Command::RemoveApp(app, reply) => {
                        self.store(&mut lines);
                        let _ = reply.send(self.remove_app(&app));
                    }
                }
            }
            self.store(&mut lines);
        }
    }

    /// Numbers and stores `lines` (emptying it), trims their apps to the ring size, then
    /// sends them to followers.
    fn store(&mut self, lines: &mut Vec<LogLine>) {
        if lines.is_empty() {
            return;
        }
        let mut numbered = Vec::with_capacity(lines.len());
        for mut line in lines.drain(..) {
            match self.take_seq(&line.app) {
                Ok(seq) => {
                    line.seq = seq;
                    numbered.push(line);
                }
                Err(error) => self.lost(1, &error),
            }
        }
        match self.ring_batch(&numbered) {
            Ok(batch) => match self.tree.apply_batch(batch) {
                Ok(()) => self.send_to_followers(numbered),
                Err(error) => self.lost(numbered.len(), &error.into()),
            },
            Err(error) => self.lost(numbered.len(), &error),
        }
    }

    /// The next `seq` of `app`, recovered from its newest stored line the first time.
    fn take_seq(&mut self, app: &str) -> Result<u64, StoreError> {
        let next = match self.next_seqs.get_mut(app) {
            Some(next) => next,
            None => {
                let recovered = match self.tree.scan_prefix(app_prefix(app)).next_back() {
                    None => 1,
                    Some(entry) => seq_of_key(&entry?.0)?.saturating_add(1),
                };
                self.next_seqs.entry(app.to_string()).or_insert(recovered)
            }
        };
        let seq = *next;
        *next += 1;
        Ok(seq)
    }

    /// One sled batch that inserts the numbered lines and removes every line that falls out
    /// of its app's ring (lines of this batch that would be removed at once are not inserted).
    fn ring_batch(&self, numbered: &[LogLine]) -> Result<sled::Batch, StoreError> {
        let mut oldest_kept: HashMap<&str, u64> = HashMap::new();
        for line in numbered {
            let next = self.next_seqs.get(&line.app).copied().unwrap_or(1);
            oldest_kept.insert(&line.app, next.saturating_sub(self.max_lines_per_app));
        }
        let mut batch = sled::Batch::default();
        for line in numbered {
            if line.seq >= oldest_kept[line.app.as_str()] {
                let json = serde_json::to_vec(line).expect("log lines serialise");
                batch.insert(line_key(&line.app, line.seq), json);
            }
        }
        for (app, oldest) in oldest_kept {
            for key in self
                .tree
                .range(line_key(app, 0)..line_key(app, oldest))
                .keys()
            {
                batch.remove(key?);
            }
        }
        Ok(batch)
    }

    fn send_to_followers(&self, stored: Vec<LogLine>) {
        let mut followers = lock(&self.followers);
        if followers.is_empty() {
            return;
        }
        for line in stored {
            if let Some(sender) = followers.get(&line.app) {
                // Fails only when nobody follows the app any more.
                if sender.send(line.clone()).is_err() {
                    followers.remove(&line.app);
                }
            }
        }
    }

    fn remove_app(&mut self, app: &str) -> Result<(), StoreError> {
        self.next_seqs.remove(app);
        lock(&self.followers).remove(app);
        let mut batch = sled::Batch::default();
        for key in self.tree.scan_prefix(app_prefix(app)).keys() {
            batch.remove(key?);
        }
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    fn lost(&self, lines: usize, error: &StoreError) {
        self.dropped.fetch_add(lines as u64, Ordering::Relaxed);
        tracing::warn!(%error, lines, "log lines could not be stored");
    }
}

fn lock(
    followers: &Followers,
) -> std::sync::MutexGuard<'_, HashMap<String, broadcast::Sender<LogLine>>> {
    followers.lock().unwrap_or_else(PoisonError::into_inner)
}

fn app_prefix(app: &str) -> Vec<u8> {
    let mut prefix = Vec::with_capacity(app.len() + 1);
    prefix.extend_from_slice(app.as_bytes());
    prefix.push(0);
    prefix
}

fn line_key(app: &str, seq: u64) -> Vec<u8> {
    let mut key = app_prefix(app);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// `<app>/<seq>`, for error messages.
fn printable_key(key: &[u8]) -> String {
    match key.split_last_chunk::<8>() {
        Some((prefix, seq)) => format!(
            "{}/{}",
            String::from_utf8_lossy(prefix).trim_end_matches('\0'),
            u64::from_be_bytes(*seq)
        ),
        None => String::from_utf8_lossy(key).into_owned(),
    }
}

fn seq_of_key(key: &[u8]) -> Result<u64, StoreError> {
    key.split_last_chunk::<8>()
        .map(|(_, seq)| u64::from_be_bytes(*seq))
        .ok_or_else(|| StoreError::Corrupt {
            key: printable_key(key),
            source: serde::de::Error::custom("a log key ends with an 8-byte sequence number"),
        })
}

fn decode_line(entry: sled::Result<(sled::IVec, sled::IVec)>) -> Result<LogLine, StoreError> {
    let (key, value) = entry?;
    serde_json::from_slice(&value).map_err(|source| StoreError::Corrupt {
        key: printable_key(&key),
        source,
    })
}

fn writer_stopped() -> StoreError {
    StoreError::Flush("the log writer stopped".into())
}

fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn line(app: &str, message: &str) -> LogLine {
        LogLine::new(app, 3, "req-1", Level::Info, Source::Stdout, message)
    }

    fn messages(lines: &[LogLine]) -> Vec<String> {
        lines.iter().map(|line| line.message.clone()).collect()
    }

    fn open(dir: &tempfile::TempDir, max_lines_per_app: usize) -> (Store, AppLogs) {
        let store = crate::testing::open_store(dir.path());
        let logs = AppLogs::open(&store, max_lines_per_app).unwrap();
        (store, logs)
    }

    #[tokio::test]
    async fn appended_lines_read_back_with_their_seqs() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, logs) = open(&dir, 100);
        logs.append(LogLine::new(
            "echo",
            7,
            "req-a",
            Level::Warn,
            Source::Stderr,
            "first",
        ));
        logs.append(line("echo", "second"));
        logs.append(line("other", "elsewhere"));
        logs.flush_pending().await.unwrap();

        let lines = logs.read("echo", None, 100).unwrap();
        assert_eq!(messages(&lines), ["first", "second"]);
        assert_eq!(lines[0].seq, 1);
        assert_eq!(lines[1].seq, 2);
        assert_eq!(lines[0].revision, 7);
        assert_eq!(lines[0].request_id, "req-a");
        assert_eq!(
            (lines[0].level, lines[0].source),
            (Level::Warn, Source::Stderr)
        );
        assert!(lines[0].time_ms > 0);
        assert_eq!(logs.read("other", None, 100).unwrap()[0].seq, 1);
        assert_eq!(logs.dropped(), 0);
    }

    #[test]
    fn lines_are_json_with_snake_case_names() {
        let mut stored = line("echo", "hi");
        stored.level = Level::Critical;
        stored.source = Source::Logging;
        let json = serde_json::to_value(&stored).unwrap();
        assert_eq!(json["level"], "critical");
        assert_eq!(json["source"], "logging");
        assert_eq!(serde_json::from_value::<LogLine>(json).unwrap(), stored);
    }

    #[tokio::test]
    async fn each_app_keeps_only_its_newest_lines() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, logs) = open(&dir, 100);
        for i in 0..250 {
            logs.append(line("echo", &i.to_string()));
            if i % 60 == 0 {
                logs.flush_pending().await.unwrap();
            }
        }
        logs.append(line("other", "kept"));
        logs.flush_pending().await.unwrap();

        let lines = logs.read("echo", Some(0), 10_000).unwrap();
        assert_eq!(lines.len(), 100);
        assert_eq!(lines[0].seq, 151);
        assert_eq!(lines[99].seq, 250);
        assert_eq!(lines[99].message, "249");
        assert_eq!(
            logs.shared.tree.scan_prefix(app_prefix("echo")).count(),
            100
        );
        assert_eq!(messages(&logs.read("other", None, 10).unwrap()), ["kept"]);
    }

    #[tokio::test]
    async fn seqs_continue_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (_store, logs) = open(&dir, 100);
            for i in 0..5 {
                logs.append(line("echo", &i.to_string()));
            }
            logs.flush_pending().await.unwrap();
        }
        let (_store, logs) = open(&dir, 100);
        logs.append(line("echo", "after"));
        logs.flush_pending().await.unwrap();
        let lines = logs.read("echo", None, 100).unwrap();
        assert_eq!(lines.len(), 6);
        assert_eq!(lines[5].seq, 6);
        assert_eq!(lines[5].message, "after");
    }

    #[tokio::test]
    async fn reads_after_a_seq_or_the_tail() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, logs) = open(&dir, 100);
        for i in 1..=10 {
            logs.append(line("echo", &i.to_string()));
        }
        logs.append(line("echo-two", "a name that extends echo"));
        logs.flush_pending().await.unwrap();

        assert_eq!(
            messages(&logs.read("echo", Some(7), 100).unwrap()),
            ["8", "9", "10"]
        );
        assert_eq!(
            messages(&logs.read("echo", Some(2), 2).unwrap()),
            ["3", "4"]
        );
        assert_eq!(
            messages(&logs.read("echo", None, 3).unwrap()),
            ["8", "9", "10"]
        );
        assert_eq!(logs.read("echo", Some(0), 100).unwrap().len(), 10);
        assert!(logs.read("echo", Some(10), 100).unwrap().is_empty());
        assert!(logs.read("echo", Some(u64::MAX), 100).unwrap().is_empty());
        assert!(logs.read("echo", None, 0).unwrap().is_empty());
        assert!(logs.read("ech", None, 100).unwrap().is_empty());
    }

    #[tokio::test]
    async fn reads_are_capped() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, logs) = open(&dir, 20_000);
        for i in 0..MAX_READ_LINES + 5 {
            logs.append(line("echo", &i.to_string()));
            if i % 4096 == 0 {
                logs.flush_pending().await.unwrap();
            }
        }
        logs.flush_pending().await.unwrap();
        assert_eq!(
            logs.read("echo", None, usize::MAX).unwrap().len(),
            MAX_READ_LINES
        );
        assert_eq!(
            logs.read("echo", Some(0), usize::MAX).unwrap().len(),
            MAX_READ_LINES
        );
    }

    #[tokio::test]
    async fn long_messages_are_cut_on_a_character_boundary() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, logs) = open(&dir, 100);
        logs.append(line("echo", &"é".repeat(MAX_MESSAGE_BYTES)));
        logs.flush_pending().await.unwrap();
        let message = &logs.read("echo", None, 1).unwrap()[0].message;
        assert_eq!(message.len(), MAX_MESSAGE_BYTES);
        assert!(message.chars().all(|c| c == 'é'));
    }

    #[tokio::test]
    async fn followers_receive_lines_once_stored() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, logs) = open(&dir, 100);
        let mut follower = logs.subscribe("echo");
        logs.append(line("other", "not followed"));
        logs.append(line("echo", "hello"));
        let received = tokio::time::timeout(Duration::from_secs(5), follower.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((received.seq, received.message.as_str()), (1, "hello"));
        assert_eq!(logs.read("echo", None, 10).unwrap(), [received]);
    }

    #[tokio::test]
    async fn a_slow_follower_is_told_it_lagged() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, logs) = open(&dir, 10_000);
        let mut follower = logs.subscribe("echo");
        for i in 0..FOLLOWER_CAPACITY + 10 {
            logs.append(line("echo", &i.to_string()));
        }
        logs.flush_pending().await.unwrap();
        assert!(matches!(
            follower.recv().await,
            Err(broadcast::error::RecvError::Lagged(10))
        ));
        assert_eq!(follower.recv().await.unwrap().seq, 11);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flood_never_blocks_and_every_line_is_stored_or_counted() {
        const THREADS: usize = 4;
        const PER_THREAD: usize = 25_000;
        let dir = tempfile::tempdir().unwrap();
        let (_store, logs) = open(&dir, PER_THREAD);
        let writers: Vec<_> = (0..THREADS)
            .map(|t| {
                let logs = logs.clone();
                std::thread::spawn(move || {
                    let app = format!("app-{t}");
                    let mut waits = Vec::with_capacity(PER_THREAD);
                    for i in 0..PER_THREAD {
                        let line = line(&app, &format!("line {i}"));
                        let started = Instant::now();
                        logs.append(line);
                        waits.push(started.elapsed());
                    }
                    waits
                })
            })
            .collect();
        let mut waits: Vec<Duration> = writers
            .into_iter()
            .flat_map(|writer| writer.join().unwrap())
            .collect();
        waits.sort();
        logs.flush_pending().await.unwrap();

        let mut stored = 0;
        for t in 0..THREADS {
            let app = format!("app-{t}");
            let count = logs.shared.tree.scan_prefix(app_prefix(&app)).count() as u64;
            let newest = logs.read(&app, None, 1).unwrap();
            assert_eq!(newest.first().map_or(0, |line| line.seq), count);
            stored += count;
        }
        assert_eq!(stored + logs.dropped(), (THREADS * PER_THREAD) as u64);
        // The slowest calls measure the scheduler of a busy machine (4 appending threads and
        // the writer on few cores), not waiting: nearly every call must be quick.
        let (p999, slowest) = (waits[waits.len() * 999 / 1000], waits[waits.len() - 1]);
        println!(
            "stored {stored}, dropped {}, append p99.9 {p999:?}, slowest {slowest:?}",
            logs.dropped()
        );
        assert!(p999 < Duration::from_millis(1), "p99.9 of appends {p999:?}");
        assert!(
            slowest < Duration::from_millis(200),
            "an append took {slowest:?}"
        );
    }

    #[tokio::test]
    async fn removing_an_app_deletes_its_lines_and_ends_its_followers() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, logs) = open(&dir, 100);
        let mut follower = logs.subscribe("echo");
        logs.append(line("echo", "gone"));
        logs.append(line("other", "kept"));
        logs.remove_app("echo").await.unwrap();

        assert!(logs.read("echo", None, 100).unwrap().is_empty());
        assert_eq!(messages(&logs.read("other", None, 100).unwrap()), ["kept"]);
        assert_eq!(follower.recv().await.unwrap().message, "gone");
        assert!(matches!(
            follower.recv().await,
            Err(broadcast::error::RecvError::Closed)
        ));
        logs.append(line("echo", "new"));
        logs.flush_pending().await.unwrap();
        assert_eq!(logs.read("echo", None, 100).unwrap()[0].seq, 1);
    }

    #[tokio::test]
    async fn a_corrupt_line_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, logs) = open(&dir, 100);
        logs.shared
            .tree
            .insert(line_key("echo", 1), &b"not json"[..])
            .unwrap();
        match logs.read("echo", None, 10) {
            Err(StoreError::Corrupt { key, .. }) => assert_eq!(key, "echo/1"),
            other => panic!("{other:?}"),
        }
        logs.append(line("echo", "next"));
        logs.flush_pending().await.unwrap();
        assert_eq!(logs.read("echo", Some(1), 10).unwrap()[0].seq, 2);
    }
}
