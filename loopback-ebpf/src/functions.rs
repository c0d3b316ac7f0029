//! Programs on kernel functions, for what no tracepoint shows: fentry first (BTF-typed, cheapest),
//! with a kprobe twin built from the same body for kernels that refuse fentry. The loader tries
//! them in that order per hook (`probes.rs`); on a kernel with neither (no ftrace patching, no
//! kprobe PMU) these hooks are simply absent and everything else works as before.
use aya_ebpf::{
    macros::{fentry, kprobe},
    programs::{FEntryContext, ProbeContext},
};
use loopback_common::Hook;

use crate::{
    emit::{Hit, emit},
    kernel::{Mem, task_in_scope},
    tracepoints::{Args, freed, sk_data_ready_body},
};

// fentry arguments are BTF-typed, but the bodies are shared with kprobes and read through
// `bpf_probe_read_kernel` either way: these hooks are on functions, whose argument types the
// verifier checks per function, and one body is simpler to keep right than two.
impl Mem for FEntryContext {
    const DIRECT: bool = false;
}
impl Mem for ProbeContext {
    const DIRECT: bool = false;
}
impl Args for FEntryContext {
    #[inline(always)]
    fn arg(&self, n: usize) -> u64 {
        FEntryContext::arg(self, n)
    }
}
impl Args for ProbeContext {
    #[inline(always)]
    fn arg(&self, n: usize) -> u64 {
        ProbeContext::arg(self, n).unwrap_or(0)
    }
}

/// One body, two programs: `fentry_<x>` on the named function and its `kprobe_<x>` twin.
macro_rules! func {
    ($name:tt, $fentry:ident, $kprobe:ident, $body:ident) => {
        #[fentry(function = $name)]
        pub fn $fentry(ctx: FEntryContext) -> u32 {
            if !crate::silent() {
                $body(&ctx);
            }
            0
        }
        #[kprobe]
        pub fn $kprobe(ctx: ProbeContext) -> u32 {
            if !crate::silent() {
                $body(&ctx);
            }
            0
        }
    };
}

// int inet_sendmsg(struct socket *sock, struct msghdr *msg, size_t size), and inet6_sendmsg: the
// socket layer's send (`sock_sendmsg` -> `sock->ops->sendmsg`), no skb yet. Hooked here rather
// than on `sock_sendmsg` itself: the send syscalls call `__sock_sendmsg`, which newer kernels
// inline, while the protocol family's sendmsg is called through the ops table and always exists.
// Linked, like the syscall, to this thread's next transmit.
func!(
    "inet_sendmsg",
    fentry_inet_sendmsg,
    kprobe_inet_sendmsg,
    sock_sendmsg_body
);
func!(
    "inet6_sendmsg",
    fentry_inet6_sendmsg,
    kprobe_inet6_sendmsg,
    sock_sendmsg_body
);
#[inline(always)]
fn sock_sendmsg_body<A: Args>(ctx: &A) -> i32 {
    if !task_in_scope::<A>() {
        return 0;
    }
    let sock: u64 = ctx.arg(0);
    emit(Hook::SockSend, 0, false, |e| e.arg0 = sock);
    0
}

/// Frees that fire no tracepoint end a tracked skb as `consume`. Frees that do fire one
/// (`kfree_skb`, `consume_skb`, which call `__kfree_skb` after their tracepoint) were already
/// seen there and the skb is out of scope by now.
#[inline(always)]
fn free_body<A: Args>(ctx: &A) -> i32 {
    freed::<A>(Hook::Consume, ctx.arg(0), Hit::default());
    0
}

// void __kfree_skb(struct sk_buff *skb): TCP frees a received pure ACK and an acknowledged
// segment here.
func!("__kfree_skb", fentry_kfree_skb_fn, kprobe_kfree_skb_fn, free_body);
// void kfree_skb_partial(struct sk_buff *skb, bool head_stolen): TCP coalesced this skb into
// the previous one on the receive queue.
func!(
    "kfree_skb_partial",
    fentry_kfree_skb_partial,
    kprobe_kfree_skb_partial,
    free_body
);
// void skb_attempt_defer_free(struct sk_buff *skb): TCP's recvmsg is done with the skb and
// hands it back to the CPU that allocated it.
func!(
    "skb_attempt_defer_free",
    fentry_skb_defer_free,
    kprobe_skb_defer_free,
    free_body
);
// void __consume_stateless_skb(struct sk_buff *skb): UDP's recvmsg after the copy.
func!(
    "__consume_stateless_skb",
    fentry_consume_stateless,
    kprobe_consume_stateless,
    free_body
);

// void sock_def_readable(struct sock *sk): what `sk->sk_data_ready` is for UDP and raw sockets;
// serves the socket-queue stage where `sock:sk_data_ready` does not exist (the same body).
func!(
    "sock_def_readable",
    fentry_sock_def_readable,
    kprobe_sock_def_readable,
    sk_data_ready_body
);
