//! Fault injection for the tests (README, Tests): `LOTRACE_FAULT`, read once, at the first use.
//! Only a build with the `test-support` feature (the one `cargo test` makes) reads it; in a
//! normal or release build [`get`] is the constant `Fault::None` and the fault branches are
//! compiled out.

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    None,
    /// `panic-on-sigusr1`: once attached, `trace` panics when SIGUSR1 arrives, so a test can
    /// check what is attached while it runs and then make it panic, with no race.
    PanicOnSigusr1,
    /// `panic-in-tui`: the dashboard panics after drawing its first packet.
    PanicInTui,
    /// `no-btf`: behave as on a kernel without BTF.
    NoBtf,
    /// `no-tcx`: tcx attachments fail, as on a kernel before 6.6 (the `lo` programs then go
    /// in as classic tc filters).
    NoTcx,
    /// `no-fentry`: fentry attachments fail, as on a kernel without ftrace trampolines (the
    /// function hooks then go in as kprobes, where the kernel has them).
    NoFentry,
    /// `miss-split-free`: the kernel programs ignore the free of every skb split into GSO
    /// segments inside its transmit, as when the kernel skips the `consume_skb` program
    /// (already running on that CPU: a recursion miss), so the split is found from its
    /// segments.
    MissSplitFree,
    /// `refuse-hook:PROGRAM`: that hook fails to attach, as on a kernel without it.
    RefuseHook(String),
}

impl Fault {
    #[cfg_attr(not(feature = "test-support"), allow(dead_code))]
    fn parse(v: &str) -> Fault {
        match v {
            "" => Fault::None,
            "panic-on-sigusr1" => Fault::PanicOnSigusr1,
            "panic-in-tui" => Fault::PanicInTui,
            "no-btf" => Fault::NoBtf,
            "no-tcx" => Fault::NoTcx,
            "no-fentry" => Fault::NoFentry,
            "miss-split-free" => Fault::MissSplitFree,
            _ => match v.strip_prefix("refuse-hook:") {
                Some(p) => Fault::RefuseHook(p.to_string()),
                None => Fault::None,
            },
        }
    }
}

/// The fault switched on for this process.
#[cfg(feature = "test-support")]
pub fn get() -> &'static Fault {
    static FAULT: std::sync::OnceLock<Fault> = std::sync::OnceLock::new();
    FAULT.get_or_init(|| Fault::parse(&std::env::var("LOTRACE_FAULT").unwrap_or_default()))
}

/// The fault switched on for this process: none, in a build without test support.
#[cfg(not(feature = "test-support"))]
pub const fn get() -> &'static Fault {
    &Fault::None
}

/// The program `refuse-hook:` names, if that is the fault.
pub fn refused_hook() -> Option<&'static str> {
    match get() {
        Fault::RefuseHook(p) => Some(p),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switches_parse_and_unknown_ones_do_nothing() {
        assert_eq!(Fault::parse("panic-on-sigusr1"), Fault::PanicOnSigusr1);
        assert_eq!(
            Fault::parse("refuse-hook:sk_data_ready"),
            Fault::RefuseHook("sk_data_ready".into())
        );
        assert_eq!(Fault::parse("no-btf"), Fault::NoBtf);
        assert_eq!(Fault::parse("no-fentry"), Fault::NoFentry);
        assert_eq!(Fault::parse("panic-after-attach"), Fault::None);
        assert_eq!(Fault::parse(""), Fault::None);
    }
}
