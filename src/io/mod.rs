//! The only place with syscalls and `unsafe`: TAP devices, the UDP underlay, netns/netlink.
#![allow(unsafe_code)]
