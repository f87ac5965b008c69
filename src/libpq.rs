//! A thin, non-blocking wrapper over libpq for talking to peers from inside the server.
//!
//! Nothing here ever blocks in libpq: connections are started with `PQconnectStartParams` and
//! polled, queries are sent with `PQsendQueryParams` on a non-blocking connection, and results
//! are read after `PQconsumeInput`. Waiting happens on the process latch together with the
//! socket, so signals and postmaster death are answered at once. The `*_wait` helpers do that
//! waiting for one connection (for SQL functions such as `add_peer`); the worker multiplexes
//! many connections itself.
//!
//! A query that takes too long is cancelled the same way: libpq's `PQcancel` blocks until the
//! server has taken the request (forever behind a link that drops packets), and the
//! non-blocking cancel functions came with libpq 17 (Debian 12's is 15), so
//! [`Conn::cancel_wait`] opens a second connection to the same server, like any other, and runs
//! `pg_cancel_backend` there, giving up after [`CANCEL_TIMEOUT`].

use std::ffi::{CStr, CString};
use std::time::{Duration, Instant};

use pgrx::pg_sys;
use pq_sys as pq;
use trompe_core::conninfo::ConnInfo;

/// A libpq failure, with the server's SQLSTATE when the server sent one.
#[derive(Debug, Clone)]
pub struct PqError {
    /// The message (libpq's or the server's), without trailing newline.
    pub message: String,
    /// The SQLSTATE the server reported, if any.
    pub sqlstate: Option<String>,
    /// What failed: connecting, or running a query.
    pub kind: PqErrorKind,
}

/// Which step of talking to a peer failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PqErrorKind {
    /// The connection could not be established (network, refused, timeout).
    Connect,
    /// The peer refused the login (authentication or authorization).
    Login,
    /// A query failed on the peer, or the connection broke during it.
    Query,
    /// We gave up waiting.
    Timeout,
}

impl std::fmt::Display for PqError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl PqError {
    /// The message with the peer's SQLSTATE, when it sent one: `... (SQLSTATE 55000 at the peer)`.
    pub fn describe(&self) -> String {
        match &self.sqlstate {
            Some(code) => format!("{} (SQLSTATE {code} at the peer)", self.message),
            None => self.message.clone(),
        }
    }

    fn new(kind: PqErrorKind, message: impl Into<String>) -> Self {
        PqError { message: message.into().trim_end().to_string(), sqlstate: None, kind }
    }
}

/// What a connection in progress waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// The socket must become readable.
    Read,
    /// The socket must become writable.
    Write,
    /// Nothing: the step is complete.
    Done,
}

/// `recv` flags: look at input without taking it, and without blocking.
const MSG_PEEK: std::ffi::c_int = 0x2;
#[cfg(target_os = "linux")]
const MSG_DONTWAIT: std::ffi::c_int = 0x40;
#[cfg(not(target_os = "linux"))]
const MSG_DONTWAIT: std::ffi::c_int = 0x80;

extern "C" {
    fn recv(socket: std::ffi::c_int, buf: *mut std::ffi::c_void, len: usize, flags: std::ffi::c_int) -> isize;
}

/// The next step of a query whose rows arrive one at a time ([`Conn::next_row`]).
pub enum RowStep {
    /// More must be read from the socket first.
    Busy,
    /// One row (a result of one row).
    Row(PgResult),
    /// The query is complete.
    End,
}

/// How long cancelling a query on a peer may take before it is given up (the connection is
/// closed anyway).
pub const CANCEL_TIMEOUT: Duration = Duration::from_secs(3);

/// An open (or opening) connection to a peer. Closed when dropped.
pub struct Conn {
    raw: *mut pq::PGconn,
    /// The parameters it was opened with (a cancel connects again with them).
    info: ConnInfo,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // SAFETY: raw came from PQconnectStartParams and is finished exactly once.
        unsafe { pq::PQfinish(self.raw) };
    }
}

impl Conn {
    /// Starts connecting with the given parameters; continue with [`Conn::poll_connect`].
    pub fn start(info: &ConnInfo) -> Result<Conn, PqError> {
        let pairs: Vec<(CString, CString)> = info
            .pairs()
            .iter()
            .map(|(k, v)| (CString::new(k.as_str()), CString::new(v.as_str())))
            .filter_map(|(k, v)| Some((k.ok()?, v.ok()?)))
            .collect();
        let mut keys: Vec<*const std::ffi::c_char> = pairs.iter().map(|(k, _)| k.as_ptr()).collect();
        let mut values: Vec<*const std::ffi::c_char> = pairs.iter().map(|(_, v)| v.as_ptr()).collect();
        keys.push(std::ptr::null());
        values.push(std::ptr::null());
        // SAFETY: keys and values are NUL-terminated arrays of C strings that outlive the call.
        let raw = unsafe { pq::PQconnectStartParams(keys.as_ptr(), values.as_ptr(), 0) };
        if raw.is_null() {
            return Err(PqError::new(PqErrorKind::Connect, "out of memory starting a connection"));
        }
        let conn = Conn { raw, info: info.clone() };
        // SAFETY: raw is a valid connection object. While connecting, errors carry their
        // SQLSTATE (see connect_error).
        unsafe {
            pq::PQsetErrorVerbosity(raw, pq::PGVerbosity::PQERRORS_VERBOSE);
            if pq::PQstatus(raw) == pq::ConnStatusType::CONNECTION_BAD {
                return Err(conn.connect_error());
            }
        }
        Ok(conn)
    }

    /// Advances connecting; `Want::Done` once the connection is ready.
    pub fn poll_connect(&mut self) -> Result<Want, PqError> {
        // SAFETY: raw is a valid connection object.
        match unsafe { pq::PQconnectPoll(self.raw) } {
            pq::PostgresPollingStatusType::PGRES_POLLING_OK => {
                // SAFETY: as above; switching an established connection to non-blocking mode and
                // its messages back to the default verbosity.
                unsafe {
                    pq::PQsetnonblocking(self.raw, 1);
                    pq::PQsetErrorVerbosity(self.raw, pq::PGVerbosity::PQERRORS_DEFAULT);
                }
                Ok(Want::Done)
            }
            pq::PostgresPollingStatusType::PGRES_POLLING_READING => Ok(Want::Read),
            pq::PostgresPollingStatusType::PGRES_POLLING_WRITING => Ok(Want::Write),
            pq::PostgresPollingStatusType::PGRES_POLLING_ACTIVE => Ok(Want::Read),
            pq::PostgresPollingStatusType::PGRES_POLLING_FAILED => Err(self.connect_error()),
        }
    }

    /// Why connecting failed. A refused login is told by the server's SQLSTATE (libpq reports
    /// connection failures only as text, in the client's and the server's language, but with
    /// verbose errors each server error carries its SQLSTATE) or by libpq's own finding that a
    /// password is needed.
    fn connect_error(&self) -> PqError {
        let (sqlstate, message) = trompe_core::pqmessage::split_verbose(&self.error_message());
        // SAFETY: raw is a valid connection object.
        let needs_password = unsafe { pq::PQconnectionNeedsPassword(self.raw) } != 0;
        let login = needs_password || sqlstate.as_deref().is_some_and(trompe_core::pqmessage::is_login_failure);
        let kind = if login { PqErrorKind::Login } else { PqErrorKind::Connect };
        let mut e = PqError::new(kind, message);
        e.sqlstate = sqlstate;
        e
    }

    /// libpq's last error message for this connection.
    pub fn error_message(&self) -> String {
        // SAFETY: PQerrorMessage returns a string owned by the connection.
        unsafe {
            let m = pq::PQerrorMessage(self.raw);
            if m.is_null() {
                String::new()
            } else {
                CStr::from_ptr(m).to_string_lossy().trim_end().to_string()
            }
        }
    }

    /// The connection's socket (changes while connecting to several hosts).
    pub fn socket(&self) -> pg_sys::pgsocket {
        // SAFETY: raw is a valid connection object.
        unsafe { pq::PQsocket(self.raw) }
    }

    /// True if bytes from the server wait on the socket, unread (without reading them): the
    /// peer is sending, however slowly.
    pub fn input_waiting(&self) -> bool {
        let mut byte = 0u8;
        // SAFETY: peeks at most one byte into a local buffer without blocking; the socket is
        // owned by libpq and stays open for the call.
        let n = unsafe { recv(self.socket(), (&mut byte as *mut u8).cast(), 1, MSG_PEEK | MSG_DONTWAIT) };
        n > 0
    }

    /// The server's version as `server_version_num` (180004 for 18.4); 0 if not connected.
    pub fn server_version(&self) -> i32 {
        // SAFETY: raw is a valid connection object.
        unsafe { pq::PQserverVersion(self.raw) }
    }

    /// True if the connection is established and not broken.
    pub fn is_ok(&self) -> bool {
        // SAFETY: raw is a valid connection object.
        unsafe { pq::PQstatus(self.raw) == pq::ConnStatusType::CONNECTION_OK }
    }

    /// Sends a query with text parameters (`None` is NULL); continue with [`Conn::flush`].
    pub fn send_query(&mut self, sql: &str, params: &[Option<&str>]) -> Result<(), PqError> {
        self.send_query_as(sql, params, false)
    }

    /// Sends a query whose results come back in binary format.
    pub fn send_query_binary(&mut self, sql: &str, params: &[Option<&str>]) -> Result<(), PqError> {
        self.send_query_as(sql, params, true)
    }

    fn send_query_as(&mut self, sql: &str, params: &[Option<&str>], binary: bool) -> Result<(), PqError> {
        let sql = CString::new(sql).map_err(|_| PqError::new(PqErrorKind::Query, "query contains a NUL byte"))?;
        let owned: Vec<Option<CString>> =
            params.iter().map(|p| p.map(|s| CString::new(s.replace('\0', "")).unwrap_or_default())).collect();
        let ptrs: Vec<*const std::ffi::c_char> =
            owned.iter().map(|p| p.as_ref().map_or(std::ptr::null(), |c| c.as_ptr())).collect();
        // SAFETY: the parameter pointers outlive the call (libpq copies them into its buffer).
        let ok = unsafe {
            pq::PQsendQueryParams(
                self.raw,
                sql.as_ptr(),
                ptrs.len() as i32,
                std::ptr::null(),
                ptrs.as_ptr(),
                std::ptr::null(),
                std::ptr::null(),
                i32::from(binary),
            )
        };
        if ok == 0 {
            return Err(PqError::new(PqErrorKind::Query, self.error_message()));
        }
        Ok(())
    }

    /// Writes pending output; `Want::Write` if some is left.
    pub fn flush(&mut self) -> Result<Want, PqError> {
        // SAFETY: raw is a valid connection object.
        match unsafe { pq::PQflush(self.raw) } {
            0 => Ok(Want::Done),
            1 => Ok(Want::Write),
            _ => Err(PqError::new(PqErrorKind::Query, self.error_message())),
        }
    }

    /// Reads what arrived on the socket; `Want::Read` while the result is incomplete.
    pub fn consume(&mut self) -> Result<Want, PqError> {
        // SAFETY: raw is a valid connection object.
        unsafe {
            if pq::PQconsumeInput(self.raw) == 0 {
                return Err(PqError::new(PqErrorKind::Query, self.error_message()));
            }
            if pq::PQisBusy(self.raw) != 0 {
                Ok(Want::Read)
            } else {
                Ok(Want::Done)
            }
        }
    }

    /// Right after a query was sent: asks for its rows one at a time ([`Conn::next_row`]), so
    /// that libpq never holds them all.
    pub fn single_row_mode(&mut self) -> Result<(), PqError> {
        // SAFETY: raw is a valid connection object with a query just sent.
        if unsafe { pq::PQsetSingleRowMode(self.raw) } == 1 {
            Ok(())
        } else {
            Err(PqError::new(PqErrorKind::Query, "could not switch to single-row mode"))
        }
    }

    /// In single-row mode, after `consume`: the next row if one is there, `Busy` if more must
    /// be read first, `End` once the query is complete; the query's error if it failed.
    pub fn next_row(&mut self) -> Result<RowStep, PqError> {
        loop {
            // SAFETY: raw is valid; PQgetResult does not block once PQisBusy says false.
            let res = unsafe {
                if pq::PQisBusy(self.raw) != 0 {
                    return Ok(RowStep::Busy);
                }
                pq::PQgetResult(self.raw)
            };
            if res.is_null() {
                return Ok(RowStep::End);
            }
            let res = PgResult { raw: res };
            // SAFETY: res is a valid result.
            match unsafe { pq::PQresultStatus(res.raw) } {
                pq::ExecStatusType::PGRES_SINGLE_TUPLE => return Ok(RowStep::Row(res)),
                // The empty result that ends the rows; the end of the query follows.
                pq::ExecStatusType::PGRES_TUPLES_OK => continue,
                _ => {
                    res.check()?;
                    return Err(PqError::new(PqErrorKind::Query, "the peer returned an unexpected result"));
                }
            }
        }
    }

    /// After `consume` returned `Done`: takes every result of the query and returns the last,
    /// or the first error.
    pub fn take_result(&mut self) -> Result<PgResult, PqError> {
        let mut last: Option<PgResult> = None;
        let mut error: Option<PqError> = None;
        loop {
            // SAFETY: raw is valid; PQgetResult returns NULL when the query is complete.
            let res = unsafe { pq::PQgetResult(self.raw) };
            if res.is_null() {
                break;
            }
            let res = PgResult { raw: res };
            if let Err(e) = res.check() {
                error.get_or_insert(e);
            } else {
                last = Some(res);
            }
        }
        if let Some(e) = error {
            return Err(e);
        }
        last.ok_or_else(|| PqError::new(PqErrorKind::Query, "the peer returned no result"))
    }

    /// After a `COPY ... TO STDOUT` was sent and `consume` returned `Done`: checks that the
    /// server started sending rows (or returns its error).
    pub fn take_copy_out(&mut self) -> Result<(), PqError> {
        // SAFETY: raw is valid; PQgetResult returns NULL when no result is left.
        let first = unsafe { pq::PQgetResult(self.raw) };
        if first.is_null() {
            return Err(PqError::new(PqErrorKind::Query, "the peer returned no result"));
        }
        let first = PgResult { raw: first };
        // SAFETY: first is a valid result.
        if unsafe { pq::PQresultStatus(first.raw) } == pq::ExecStatusType::PGRES_COPY_OUT {
            return Ok(());
        }
        let error = first.check().err();
        drop(first);
        // The statement failed: collect what is left, so the connection is idle again.
        let _ = self.take_result();
        Err(error.unwrap_or_else(|| PqError::new(PqErrorKind::Query, "the peer did not start a COPY")))
    }

    /// The next row of a COPY in progress, without blocking.
    pub fn copy_row(&mut self) -> Result<CopyRow, PqError> {
        let mut buf: *mut std::ffi::c_char = std::ptr::null_mut();
        // SAFETY: raw is valid; in async mode PQgetCopyData never blocks; a row it returns is
        // copied and then freed with PQfreemem.
        let n = unsafe { pq::PQgetCopyData(self.raw, &mut buf, 1) };
        match n {
            0 => Ok(CopyRow::Wait),
            -1 => Ok(CopyRow::End),
            n if n > 0 && !buf.is_null() => {
                // SAFETY: buf holds n bytes allocated by libpq.
                let row = unsafe { std::slice::from_raw_parts(buf as *const u8, n as usize).to_vec() };
                // SAFETY: freeing what PQgetCopyData allocated, once.
                unsafe { pq::PQfreemem(buf as *mut std::ffi::c_void) };
                Ok(CopyRow::Row(row))
            }
            _ => Err(PqError::new(PqErrorKind::Query, self.error_message())),
        }
    }

    /// Reads what arrived on the socket into libpq's buffer.
    pub fn consume_input(&mut self) -> Result<(), PqError> {
        // SAFETY: raw is a valid connection object.
        if unsafe { pq::PQconsumeInput(self.raw) } == 0 {
            return Err(PqError::new(PqErrorKind::Query, self.error_message()));
        }
        Ok(())
    }

    /// Cancels the query in progress without blocking in libpq: connects to the same server
    /// again (the host and address this connection reached, with the same parameters) and
    /// runs `pg_cancel_backend` on this connection's server process, which the same login may
    /// do. Waits (interruptibly) at most `timeout`, and gives up after it.
    pub fn cancel_wait(&self, timeout: Duration) -> Result<(), PqError> {
        let deadline = Instant::now() + timeout;
        let left = || deadline.saturating_duration_since(Instant::now());
        // SAFETY: raw is a valid connection object.
        let pid = unsafe { pq::PQbackendPID(self.raw) };
        if pid == 0 {
            return Ok(());
        }
        let mut info = self.info.clone();
        // SAFETY: PQhost, PQhostaddr and PQport return strings owned by the connection, or NULL.
        let (host, hostaddr, port) =
            unsafe { (owned(pq::PQhost(self.raw)), owned(pq::PQhostaddr(self.raw)), owned(pq::PQport(self.raw))) };
        for (key, value) in [("host", host), ("hostaddr", hostaddr), ("port", port)] {
            match value.filter(|v| !v.is_empty()) {
                Some(v) => info.set(key, &v),
                None => {
                    info.take(key);
                }
            }
        }
        info.take("target_session_attrs");
        info.set("application_name", "trompe cancel");
        let mut conn = connect_wait(&info, timeout)?;
        send_wait(&mut conn, "SELECT pg_catalog.pg_cancel_backend($1::int)", &[Some(&pid.to_string())], left())?;
        collect(&mut conn, deadline, false).map(drop)
    }

    /// [`Conn::cancel_wait`] within [`CANCEL_TIMEOUT`]; a cancel that fails is only noted in
    /// the server log at DEBUG1 (the caller gives up on the query either way).
    fn cancel_quietly(&self) {
        if let Err(e) = self.cancel_wait(CANCEL_TIMEOUT) {
            pgrx::debug1!("trompe: cancelling a query on a peer failed: {e}");
        }
    }
}

/// A C string owned by libpq, copied (`None` for NULL).
///
/// # Safety
/// `p` is NULL or a NUL-terminated string that stays valid during the call.
unsafe fn owned(p: *const std::ffi::c_char) -> Option<String> {
    // SAFETY: as the caller promises.
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

/// One step of reading a `COPY ... TO STDOUT`.
pub enum CopyRow {
    /// A row in COPY text format (with its newline).
    Row(Vec<u8>),
    /// No complete row yet: wait until the socket is readable, then `consume_input`.
    Wait,
    /// The COPY ended: its final status follows (`consume` until `Done`, then `take_result`).
    End,
}

/// A query result. Freed when dropped.
pub struct PgResult {
    raw: *mut pq::PGresult,
}

impl Drop for PgResult {
    fn drop(&mut self) {
        // SAFETY: raw came from PQgetResult and is cleared exactly once.
        unsafe { pq::PQclear(self.raw) };
    }
}

impl PgResult {
    fn check(&self) -> Result<(), PqError> {
        // SAFETY: raw is a valid result.
        let status = unsafe { pq::PQresultStatus(self.raw) };
        match status {
            pq::ExecStatusType::PGRES_TUPLES_OK | pq::ExecStatusType::PGRES_COMMAND_OK => Ok(()),
            _ => {
                let field = |code: u8| {
                    // SAFETY: PQresultErrorField returns a string owned by the result or NULL.
                    unsafe {
                        let p = pq::PQresultErrorField(self.raw, code as i32);
                        (!p.is_null()).then(|| CStr::from_ptr(p).to_string_lossy().into_owned())
                    }
                };
                let message = field(b'M').unwrap_or_else(|| {
                    // SAFETY: as above, for the whole message.
                    unsafe {
                        let p = pq::PQresultErrorMessage(self.raw);
                        if p.is_null() {
                            "unknown error".to_string()
                        } else {
                            CStr::from_ptr(p).to_string_lossy().into_owned()
                        }
                    }
                });
                let mut e = PqError::new(PqErrorKind::Query, message);
                e.sqlstate = field(b'C');
                Err(e)
            }
        }
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        // SAFETY: raw is a valid result.
        unsafe { pq::PQntuples(self.raw).max(0) as usize }
    }

    /// Number of columns.
    pub fn columns(&self) -> usize {
        // SAFETY: raw is a valid result.
        unsafe { pq::PQnfields(self.raw).max(0) as usize }
    }

    /// The raw bytes at (row, column), `None` for NULL or out of range.
    pub fn bytes(&self, row: usize, col: usize) -> Option<&[u8]> {
        if row >= self.rows() || col >= self.columns() {
            return None;
        }
        // SAFETY: row and col are in range; the value is owned by the result.
        unsafe {
            if pq::PQgetisnull(self.raw, row as i32, col as i32) != 0 {
                return None;
            }
            let p = pq::PQgetvalue(self.raw, row as i32, col as i32);
            let len = pq::PQgetlength(self.raw, row as i32, col as i32).max(0) as usize;
            Some(std::slice::from_raw_parts(p as *const u8, len))
        }
    }

    /// A binary int8 at (row, column).
    pub fn int8(&self, row: usize, col: usize) -> Option<i64> {
        self.bytes(row, col).and_then(|b| b.try_into().ok()).map(i64::from_be_bytes)
    }

    /// The value at (row, column) as text, `None` for NULL or out of range.
    pub fn get(&self, row: usize, col: usize) -> Option<&str> {
        self.bytes(row, col).and_then(|b| std::str::from_utf8(b).ok())
    }
}

/// Checks a connection string the way the linked libpq reads it (`PQconninfoParse`): an
/// option this libpq does not know is refused with libpq's own message, which names the option
/// (never a value).
pub fn check_conninfo(info: &ConnInfo) -> Result<(), String> {
    let text =
        CString::new(info.to_keyword_value()).map_err(|_| "the connection string contains a NUL byte".to_string())?;
    let mut errmsg: *mut std::ffi::c_char = std::ptr::null_mut();
    // SAFETY: text is a valid C string; PQconninfoParse returns an allocated option array or
    // NULL with an allocated message, each freed with the matching libpq function.
    unsafe {
        let options = pq::PQconninfoParse(text.as_ptr(), &mut errmsg);
        if !options.is_null() {
            pq::PQconninfoFree(options);
            return Ok(());
        }
        if errmsg.is_null() {
            return Err("out of memory parsing the connection string".to_string());
        }
        let message = CStr::from_ptr(errmsg).to_string_lossy().trim_end().to_string();
        pq::PQfreemem(errmsg.cast());
        Err(message)
    }
}

/// Waits until `sock` is ready for `want`, the latch is set, or `timeout` passes; handles
/// interrupts (cancel, termination) and postmaster death.
pub fn wait_socket(sock: pg_sys::pgsocket, want: Want, timeout: Duration) {
    let mut events = pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH;
    match want {
        Want::Read => events |= pg_sys::WL_SOCKET_READABLE,
        Want::Write => events |= pg_sys::WL_SOCKET_WRITEABLE,
        Want::Done => {}
    }
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as std::ffi::c_long;
    // SAFETY: waiting on our own latch and a socket we own; ResetLatch before re-checking.
    unsafe {
        pg_sys::WaitLatchOrSocket(pg_sys::MyLatch, events as i32, sock, ms, pg_sys::PG_WAIT_EXTENSION);
        pg_sys::ResetLatch(pg_sys::MyLatch);
    }
    pgrx::check_for_interrupts!();
}

/// Connects, waiting (interruptibly) up to `timeout`.
pub fn connect_wait(info: &ConnInfo, timeout: Duration) -> Result<Conn, PqError> {
    let deadline = Instant::now() + timeout;
    let mut conn = Conn::start(info)?;
    loop {
        match conn.poll_connect()? {
            Want::Done => return Ok(conn),
            want => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(PqError::new(PqErrorKind::Timeout, "timed out connecting"));
                }
                wait_socket(conn.socket(), want, left);
            }
        }
    }
}

/// Runs one query on an established connection, waiting (interruptibly) up to `timeout`.
pub fn query_wait(conn: &mut Conn, sql: &str, params: &[Option<&str>], timeout: Duration) -> Result<PgResult, PqError> {
    let deadline = Instant::now() + timeout;
    send_wait(conn, sql, params, timeout)?;
    result_wait(conn, deadline.saturating_duration_since(Instant::now()))
}

/// Sends one query, waiting (interruptibly) up to `timeout` until it is sent; its result is
/// then collected with [`result_wait`], and the caller may do other work meanwhile.
pub fn send_wait(conn: &mut Conn, sql: &str, params: &[Option<&str>], timeout: Duration) -> Result<(), PqError> {
    let deadline = Instant::now() + timeout;
    let left = || deadline.saturating_duration_since(Instant::now());
    conn.send_query(sql, params)?;
    while conn.flush()? == Want::Write {
        if left().is_zero() {
            return Err(PqError::new(PqErrorKind::Timeout, "timed out sending a query"));
        }
        wait_socket(conn.socket(), Want::Write, left());
    }
    Ok(())
}

/// Waits (interruptibly) up to `timeout` for the result of the query sent last; a query that
/// takes longer is cancelled (see [`Conn::cancel_wait`]).
pub fn result_wait(conn: &mut Conn, timeout: Duration) -> Result<PgResult, PqError> {
    collect(conn, Instant::now() + timeout, true)
}

/// Waits until `deadline` for the result of the query sent last, cancelling it on timeout if
/// `cancel` (not for the cancel's own query).
fn collect(conn: &mut Conn, deadline: Instant, cancel: bool) -> Result<PgResult, PqError> {
    let left = || deadline.saturating_duration_since(Instant::now());
    while conn.consume()? == Want::Read {
        if left().is_zero() {
            if cancel {
                conn.cancel_quietly();
                finish_cancelled(conn, Instant::now() + CANCEL_TIMEOUT);
            }
            return Err(PqError::new(PqErrorKind::Timeout, "timed out waiting for the peer's answer"));
        }
        wait_socket(conn.socket(), Want::Read, left());
    }
    conn.take_result()
}

/// Reads what is left of a cancelled query (its error, usually at once) until `deadline`, so
/// that the connection can take the next query; one still busy after it fails that query.
fn finish_cancelled(conn: &mut Conn, deadline: Instant) {
    loop {
        match conn.consume() {
            Ok(Want::Read) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return;
                }
                wait_socket(conn.socket(), Want::Read, left);
            }
            Ok(_) => {
                // The cancelled query's outcome, an error or its late result: dropped.
                let _ = conn.take_result();
                return;
            }
            Err(_) => return,
        }
    }
}

/// Sends a `COPY ... TO STDOUT` and waits (interruptibly) up to `timeout` until the peer starts
/// sending its rows; read them with [`copy_out_row`].
pub fn copy_out_start(conn: &mut Conn, sql: &str, params: &[Option<&str>], timeout: Duration) -> Result<(), PqError> {
    let deadline = Instant::now() + timeout;
    send_wait(conn, sql, params, timeout)?;
    while conn.consume()? == Want::Read {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            conn.cancel_quietly();
            return Err(PqError::new(PqErrorKind::Timeout, "timed out waiting for the peer's answer"));
        }
        wait_socket(conn.socket(), Want::Read, left);
    }
    conn.take_copy_out()
}

/// The next row of a COPY started with [`copy_out_start`] (`None` once it ended well), waiting
/// (interruptibly) up to `timeout` for it.
pub fn copy_out_row(conn: &mut Conn, timeout: Duration) -> Result<Option<Vec<u8>>, PqError> {
    let deadline = Instant::now() + timeout;
    loop {
        match conn.copy_row()? {
            CopyRow::Row(row) => return Ok(Some(row)),
            CopyRow::End => {
                // The COPY's final status tells whether it succeeded.
                result_wait(conn, deadline.saturating_duration_since(Instant::now()))?;
                return Ok(None);
            }
            CopyRow::Wait => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    conn.cancel_quietly();
                    return Err(PqError::new(PqErrorKind::Timeout, "timed out waiting for the peer's rows"));
                }
                wait_socket(conn.socket(), Want::Read, left);
                conn.consume_input()?;
            }
        }
    }
}
