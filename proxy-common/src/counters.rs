//! The kernel's counters, one copy per CPU that userspace sums. Each struct is declared once,
//! through [`counters!`], which also gives it [`ServiceCounters::add`] (the sum over CPUs) and,
//! for userspace, its serialisation.

/// Declares a `#[repr(C)]` struct of `u64` counters with an `add` that sums two of them field
/// by field, so a new counter is written in one place. Field attributes pass through (serde's
/// among them, under the `user` feature).
macro_rules! counters {
    ($(#[$meta:meta])* pub struct $name:ident {
        $($(#[$field_meta:meta])* pub $field:ident,)*
    }) => {
        $(#[$meta])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        #[cfg_attr(feature = "user", derive(serde::Serialize))]
        pub struct $name {
            $($(#[$field_meta])* pub $field: u64,)*
        }

        impl $name {
            /// Adds `other` to these counters, field by field.
            pub fn add(&mut self, other: &Self) {
                $(self.$field += other.$field;)*
            }
        }
    };
}

counters! {
    /// Per-service counters (index: the service's number in [`crate::names::SERVICE_STATS`]).
    pub struct ServiceCounters {
        /// Bytes from clients redirected to backends.
        pub bytes_to_backend,
        /// Bytes from backends redirected to clients.
        pub bytes_to_client,
        /// Receive batches (skbs) redirected.
        pub segments,
        /// Redirects the kernel refused.
        pub redirect_failures,
        /// Flow-control events emitted to userspace.
        pub flow_events,
        /// Flow-control events lost because the ring buffer was full.
        pub events_lost,
        /// Events telling userspace that a held socket's peer has drained (see
        /// [`crate::Link::drained_at`]).
        pub drain_events,
        /// Times the kernel took a socket out of the verdict map for a hold.
        #[cfg_attr(feature = "user", serde(rename = "kernel_holds"))]
        pub holds,
        /// Received batches whose head repeated bytes already passed on (trimmed).
        pub overlaps,
        /// Bytes trimmed off such batches.
        pub overlap_bytes,
        /// Holes found between batches, and batches that could not be trimmed; each aborts
        /// its connection.
        pub stream_faults,
    }
}

counters! {
    /// What entered the send path of spliced sockets, counted by the `sk_msg` program
    /// ([`crate::names::SENT`]): bytes the verdict redirected (the kernel's worker sends them
    /// through the socket's `sendmsg`) and bytes the daemon wrote itself.
    pub struct SentBytes {
        /// `sendmsg` calls.
        pub messages,
        /// Bytes.
        pub bytes,
    }
}

const _: () = {
    assert!(core::mem::size_of::<ServiceCounters>() == 88);
    assert!(core::mem::size_of::<SentBytes>() == 16);
};
