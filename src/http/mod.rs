//! The one HTTP serving layer of every fabric service (DESIGN, "Shared decisions").
//!
//! [`Server::serve`] runs any [`axum::Router`] over hyper-util's HTTP/1.1 + HTTP/2 connection
//! builder, with upgrades (`101`), behind an accept step ([`Accept`]: plain TCP now, a TLS
//! acceptor later), and bounds what a client can hold:
//! - **header-read timeout**: from accept (handshake included) to the end of the first request
//!   head, and from the first byte of each later head to its end;
//! - **idle timeout**, only between requests: a keep-alive connection with no request in
//!   flight and no byte of a new one is closed. While a response is produced or streamed
//!   (long-poll, streaming, upgraded connections) no timeout applies; TCP keepalive detects
//!   dead peers there;
//! - **connection caps**, overall (lowered to what `RLIMIT_NOFILE` leaves) and per source (an
//!   IPv4 address or an IPv6 /64). At the overall cap a new connection takes the slot of the
//!   oldest idle connection of the source holding the most, if that source holds more than the
//!   newcomer's; so a fresh client always gets in while anyone holds idle connections above
//!   its share;
//! - **body cap**: a request whose body is (declared or found) larger than the cap is answered
//!   413 with a restify-style body (or the service's own [`Refusal`]);
//! - **head size**: hyper's read buffer (HTTP/1) and header list (HTTP/2) are capped.
//!
//! Every refusal and timeout has a counter in [`Stats`], which a service renders on its
//! `/metrics`. The bookkeeping (who may connect, which deadline applies) is sans-IO in
//! [`conns`] and tested there; [`serve`] does the I/O.

pub mod conns;
pub mod limits;
pub mod serve;

pub use limits::{Limits, LimitsError};
pub use serve::{restify_refusal, Accept, PlainTcp, Refusal, Server, Stats};
