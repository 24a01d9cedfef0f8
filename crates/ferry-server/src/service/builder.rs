//! [`ServiceOptions`] and [`SyncServiceBuilder`]: the service's tunables,
//! checked before anything is created, and how a [`SyncService`] is put
//! together (migration, strategies of the rules, the clock's start past
//! every stored clock).

use super::*;

/// Tunables of the service. Every limit has its unit in its name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ServiceOptions {
    /// Seconds between keepalive lines on an idle stream.
    pub keepalive_interval_s: u64,
    /// Most op log entries in one `data` line. Default 2,000: a client
    /// holds a few lines decoded at once (received, decoding, handled), so
    /// smaller lines keep its memory low and even during a large download
    /// at no cost in throughput (10,000-op lines of tickets held about
    /// 36 MB more at the peak).
    pub max_ops_per_line: usize,
    /// Most bytes of one encoded `data` line, newline included (as a
    /// transport writes it): a line is cut before an entry that would pass
    /// it, and holds at least one entry. Must stay at or below the
    /// clients' line limit, `ferry_protocol::DEFAULT_MAX_LINE_BYTES`
    /// (clients refuse longer lines, so a bucket holding one would never
    /// sync); [`SyncServiceBuilder::build`] refuses more.
    pub max_line_bytes: usize,
    /// Most streams open at once; more are refused (retryable).
    pub max_concurrent_streams: usize,
    /// Lines buffered per stream before the server waits for the client.
    pub stream_buffer_lines: usize,
    /// Most bytes of lines one stream holds that its client has not read:
    /// lines read and waiting for the transport, plus one line (at most
    /// `max_line_bytes`) for the transport to write. A client that stops
    /// reading stops its stream's reads there. At least twice
    /// `max_line_bytes`; [`SyncServiceBuilder::build`] refuses less.
    pub max_stream_buffer_bytes: usize,
    /// Most bytes of lines all of one user's streams hold that their
    /// clients have not read (of each stream's `max_stream_buffer_bytes`),
    /// so a user who opens many streams and reads none pins at most this
    /// much, plus one line per stream: a stream whose client took every
    /// line may always send the next. Streams of other users do not
    /// share it. At least twice `max_line_bytes`;
    /// [`SyncServiceBuilder::build`] refuses less.
    pub max_stream_buffer_bytes_per_user: usize,
    /// How far ahead of server time a client HLC may be; later ones are
    /// clamped to server time + this. A clock up to this far ahead wins
    /// last-write-wins conflicts in that window
    /// (`docs/adr/0006-client-clocks.md`).
    pub max_clock_skew_ms: u64,
    /// Most ops in one upload request.
    pub max_upload_ops: usize,
    /// Most bucket instances one user gets.
    pub max_buckets_per_user: usize,
    /// Longest client id accepted.
    pub max_client_id_bytes: usize,
    /// Largest step of a client's seqs: an upload whose new seqs reach
    /// more than this above the client's last seq (above 0 for a new
    /// client) is refused whole.
    pub max_seq_gap: u64,
    /// Largest JSON encoding of a row as stored and sent (serde_json of
    /// its values; a control character takes 6 bytes). A write whose row,
    /// or a side write whose merged row, is larger is rejected. The
    /// default, 4 MiB, keeps a `data` line of one row far below the
    /// clients' 16 MiB line limit (`ferry_protocol::DEFAULT_MAX_LINE_BYTES`);
    /// the builder refuses more than half of it.
    pub max_row_encoded_bytes: usize,
    /// Largest upload answer (JSON). A larger one leaves out the rows of
    /// its `merged` outcomes, largest first, then shortens its reasons;
    /// every op keeps its outcome. The builder refuses more than the
    /// clients' 16 MiB limit.
    pub max_answer_bytes: usize,
    /// Row, id and transaction limits.
    pub limits: Limits,
}

impl Default for ServiceOptions {
    fn default() -> Self {
        ServiceOptions {
            keepalive_interval_s: 20,
            max_ops_per_line: 2_000,
            max_line_bytes: 8 * 1024 * 1024,
            max_concurrent_streams: 10_000,
            stream_buffer_lines: 8,
            max_stream_buffer_bytes: 16 * 1024 * 1024,
            max_stream_buffer_bytes_per_user: 64 * 1024 * 1024,
            max_clock_skew_ms: 5_000,
            max_upload_ops: 100_000,
            max_buckets_per_user: 1000,
            max_client_id_bytes: 256,
            max_seq_gap: 1_000_000,
            max_row_encoded_bytes: 4 * 1024 * 1024,
            max_answer_bytes: 8 * 1024 * 1024,
            limits: Limits::default(),
        }
    }
}

/// Builds a [`SyncService`].
#[derive(Debug)]
pub struct SyncServiceBuilder {
    db: Arc<dyn SourceDb>,
    rules: SyncRules,
    jwt_secret: String,
    auth: Option<Authenticator>,
    options: ServiceOptions,
    clock: Arc<dyn Clock>,
    strategies: BTreeMap<String, Arc<dyn ConflictStrategy>>,
    default_strategy: Arc<dyn ConflictStrategy>,
    node_id: String,
}

/// The node id of the server's hybrid logical clock unless set
/// ([`SyncServiceBuilder::node_id`]).
pub const DEFAULT_NODE_ID: &str = "server";

/// Longest node id of a server's clock.
pub const MAX_NODE_ID_BYTES: usize = 64;

impl SyncServiceBuilder {
    /// The node id of this server's hybrid logical clock (default
    /// `"server"`). Servers sharing one database need distinct
    /// ones, so two of their writes at the same instant never tie:
    /// `ferry_server::run` gives each process `server-<random hex>`.
    pub fn node_id(mut self, node_id: impl Into<String>) -> Self {
        self.node_id = node_id.into();
        self
    }

    /// Set the options.
    pub fn options(mut self, options: ServiceOptions) -> Self {
        self.options = options;
        self
    }

    /// Verify tokens with `auth` (JWKS, static keys, claim checks)
    /// instead of the HS256 secret given to [`SyncService::builder`].
    pub fn authenticator(mut self, auth: Authenticator) -> Self {
        self.auth = Some(auth);
        self
    }

    /// Set the clock (default: system time).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Use `strategy` for writes to `table`.
    pub fn strategy(mut self, table: &str, strategy: Arc<dyn ConflictStrategy>) -> Self {
        self.strategies.insert(table.to_owned(), strategy);
        self
    }

    /// Use `strategy` for tables without their own (default: [`LastWriteWins`]).
    pub fn default_strategy(mut self, strategy: Arc<dyn ConflictStrategy>) -> Self {
        self.default_strategy = strategy;
        self
    }

    /// Create the schema's tables and build the service. Strategies of
    /// the sync rules' `[[strategies]]` apply to tables given none here.
    /// Options a client could not follow are refused before anything is
    /// created (`ServiceError::Config`): a `max_line_bytes` above
    /// `ferry_protocol::DEFAULT_MAX_LINE_BYTES`.
    pub fn build(mut self) -> Result<SyncService> {
        let max_line_bytes = self.options.max_line_bytes;
        if max_line_bytes > ferry_protocol::DEFAULT_MAX_LINE_BYTES {
            return Err(ServiceError::Config(format!(
                "max_line_bytes of {max_line_bytes} bytes exceeds the clients' line limit of {} bytes",
                ferry_protocol::DEFAULT_MAX_LINE_BYTES
            )));
        }
        let buffer = self.options.max_stream_buffer_bytes;
        if buffer < max_line_bytes.saturating_mul(2) {
            return Err(ServiceError::Config(format!(
                "max_stream_buffer_bytes of {buffer} bytes is below twice max_line_bytes ({max_line_bytes} bytes): \
                 a stream holds a line being written and one read ahead"
            )));
        }
        let per_user = self.options.max_stream_buffer_bytes_per_user;
        if per_user < max_line_bytes.saturating_mul(2) {
            return Err(ServiceError::Config(format!(
                "max_stream_buffer_bytes_per_user of {per_user} bytes is below twice max_line_bytes \
                 ({max_line_bytes} bytes): a user's stream holds a line being written and one read ahead"
            )));
        }
        let max_answer_bytes = self.options.max_answer_bytes;
        if max_answer_bytes > ferry_protocol::DEFAULT_MAX_LINE_BYTES {
            return Err(ServiceError::Config(format!(
                "max_answer_bytes of {max_answer_bytes} bytes exceeds the clients' answer limit of {} bytes",
                ferry_protocol::DEFAULT_MAX_LINE_BYTES
            )));
        }
        // Half a line: the rest is room for the entry's bucket, table, id
        // and numbers, so one row always fits in one `data` line.
        let max_row = self.options.max_row_encoded_bytes;
        if max_row > ferry_protocol::DEFAULT_MAX_LINE_BYTES / 2 {
            return Err(ServiceError::Config(format!(
                "max_row_encoded_bytes of {max_row} bytes exceeds half the clients' line limit ({} bytes)",
                ferry_protocol::DEFAULT_MAX_LINE_BYTES / 2
            )));
        }
        self.db.migrate(self.rules.schema())?;
        self.rules.log_write_permissions();
        for st in self.rules.strategies() {
            if !self.strategies.contains_key(&st.table) {
                let s = st.build().map_err(|e| ServiceError::Config(e.to_string()))?;
                self.strategies.insert(st.table.clone(), s);
            }
        }
        // The server's clock starts past every clock it ever stored, also
        // when its wall clock is now behind them (the skew bound is
        // widened just enough to take the stored mark in).
        let mark = self.db.max_clock()?;
        let ahead_ms = mark
            .as_ref()
            .map_or(0, |m| m.wall_ms.saturating_sub(self.clock.now_ms()));
        if self.node_id.is_empty() || self.node_id.len() > MAX_NODE_ID_BYTES {
            return Err(ServiceError::Config(format!(
                "server node id {:?} must be 1 to {MAX_NODE_ID_BYTES} bytes",
                self.node_id
            )));
        }
        let hlc = HybridClock::new(
            self.clock.clone(),
            self.node_id.as_str(),
            self.options.max_clock_skew_ms.max(ahead_ms),
        );
        if let Some(m) = &mark {
            hlc.observe(m)?;
        }
        let streams = Arc::new(Semaphore::new(self.options.max_concurrent_streams));
        let stream_buffers = crate::stream_out::UserBuffers::new(self.options.max_stream_buffer_bytes_per_user);
        Ok(SyncService {
            inner: Arc::new(Inner {
                db: self.db,
                rules: self.rules,
                auth: self.auth.unwrap_or_else(|| Authenticator::new(&self.jwt_secret)),
                clock: self.clock,
                hlc,
                options: self.options,
                strategies: self.strategies,
                default_strategy: self.default_strategy,
                shutdown: watch::channel(false).0,
                streams,
                stream_buffers,
                upload_locks: parking_lot::Mutex::new(HashMap::new()),
                metrics: Arc::new(crate::metrics::Metrics::new()?),
                feed: super::feed::Feed::new(),
            }),
        })
    }
}

impl SyncService {
    /// Start building a service over `db` with `rules`, verifying tokens
    /// signed with `jwt_secret`.
    pub fn builder(db: Arc<dyn SourceDb>, rules: SyncRules, jwt_secret: &str) -> SyncServiceBuilder {
        SyncServiceBuilder {
            db,
            rules,
            jwt_secret: jwt_secret.to_owned(),
            auth: None,
            options: ServiceOptions::default(),
            clock: Arc::new(SystemClock),
            strategies: BTreeMap::new(),
            default_strategy: Arc::new(LastWriteWins),
            node_id: DEFAULT_NODE_ID.to_owned(),
        }
    }
}
