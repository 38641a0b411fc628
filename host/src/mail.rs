//! The SMTP client: lettre's protocol over connections we open and pool
//! ourselves.
//!
//! Why not lettre's own transport: it leaves Nagle's algorithm on and
//! writes a message's body and its terminating `.` separately, so every
//! message waits out the peer's delayed ACK (about 40 ms on Linux): 50 ms a
//! message on loopback where 3 ms will do. A delivery the relay has accepted
//! but that is not yet marked delivered is what a crash would send again, so
//! that wait also widened the window for repeats. Here every plain TCP
//! connection has `TCP_NODELAY`.

use std::sync::Mutex;
use std::time::Duration;

use lettre::address::Envelope;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, TlsParameters};
use lettre::transport::smtp::extension::ClientId;

use crate::config::{self, SmtpTls};

/// Why a message was not sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MailError {
    /// The relay refused it for good (5xx): retrying will not help.
    Permanent(String),
    /// Network trouble, a timeout, or a 4xx: worth another try.
    Transient(String),
}

impl From<lettre::transport::smtp::Error> for MailError {
    fn from(e: lettre::transport::smtp::Error) -> MailError {
        if e.is_permanent() {
            MailError::Permanent(format!("smtp: {e}"))
        } else {
            MailError::Transient(format!("smtp: {e}"))
        }
    }
}

/// Idle connections kept for reuse.
const IDLE: usize = 16;

pub struct Mailer {
    host: String,
    port: u16,
    tls: SmtpTls,
    credentials: Option<Credentials>,
    timeout: Duration,
    hello: ClientId,
    idle: Mutex<Vec<AsyncSmtpConnection>>,
}

impl Mailer {
    pub fn new(cfg: &config::Smtp) -> Mailer {
        Mailer {
            host: cfg.host.clone(),
            port: cfg.port,
            tls: cfg.tls,
            credentials: cfg
                .username
                .clone()
                .zip(cfg.password.clone())
                .map(|(u, p)| Credentials::new(u, p)),
            timeout: cfg.timeout.0,
            hello: ClientId::default(),
            idle: Mutex::new(Vec::new()),
        }
    }

    async fn connect(&self) -> Result<AsyncSmtpConnection, MailError> {
        let tls = || TlsParameters::new(self.host.clone()).map_err(MailError::from);
        let mut conn = match self.tls {
            SmtpTls::Tls => {
                AsyncSmtpConnection::connect_tokio1(
                    (self.host.as_str(), self.port),
                    Some(self.timeout),
                    &self.hello,
                    Some(tls()?),
                    None,
                )
                .await?
            }
            SmtpTls::None | SmtpTls::Starttls => {
                let addr = (self.host.as_str(), self.port);
                let tcp = tokio::time::timeout(self.timeout, tokio::net::TcpStream::connect(addr))
                    .await
                    .map_err(|_| {
                        MailError::Transient(format!(
                            "smtp: connecting to {}:{} timed out",
                            self.host, self.port
                        ))
                    })?
                    .map_err(|e| {
                        MailError::Transient(format!(
                            "smtp: connecting to {}:{}: {e}",
                            self.host, self.port
                        ))
                    })?;
                tcp.set_nodelay(true)
                    .map_err(|e| MailError::Transient(format!("smtp: TCP_NODELAY: {e}")))?;
                let mut conn =
                    AsyncSmtpConnection::connect_with_transport(Box::new(tcp), &self.hello).await?;
                if self.tls == SmtpTls::Starttls {
                    conn.starttls(tls()?, &self.hello).await?;
                }
                conn
            }
        };
        if let Some(c) = &self.credentials {
            conn.auth(&[Mechanism::Plain, Mechanism::Login], c).await?;
        }
        Ok(conn)
    }

    fn take_idle(&self) -> Option<AsyncSmtpConnection> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }

    fn put_idle(&self, conn: AsyncSmtpConnection) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < IDLE && !conn.has_broken() {
            idle.push(conn);
        }
    }

    /// Sends one formatted message; done when the relay has accepted it.
    pub async fn send(&self, envelope: &Envelope, message: &[u8]) -> Result<(), MailError> {
        // A pooled connection the relay has since closed fails at once:
        // then try once more on a fresh one.
        if let Some(mut conn) = self.take_idle() {
            match tokio::time::timeout(self.timeout, conn.send(envelope, message)).await {
                Ok(Ok(_)) => {
                    self.put_idle(conn);
                    return Ok(());
                }
                Ok(Err(e)) if e.is_permanent() => return Err(e.into()),
                // The relay may or may not have the message: a new attempt
                // may repeat it, with the same Message-ID.
                _ => {}
            }
        }
        let mut conn = self.connect().await?;
        match tokio::time::timeout(self.timeout, conn.send(envelope, message)).await {
            Ok(Ok(_)) => {
                self.put_idle(conn);
                Ok(())
            }
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(MailError::Transient(format!(
                "smtp: no answer from {}:{} within {:?}",
                self.host, self.port, self.timeout
            ))),
        }
    }
}
