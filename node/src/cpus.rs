//! `llnode start --cpus`: keeps a node on some of the device's cores (a
//! phone's big cores, or a core of its own for each node a machine hosts).

use std::str::FromStr;

/// Cores as `0,2-3`, in order, each once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuList(pub Vec<usize>);

impl FromStr for CpuList {
    type Err = String;

    fn from_str(text: &str) -> Result<CpuList, String> {
        let bad = || format!("{text:?} is not a list of cores such as 0,2-3");
        let mut cpus = Vec::new();
        for part in text.split(',') {
            let (first, last) = part.split_once('-').unwrap_or((part, part));
            let first: usize = first.trim().parse().map_err(|_| bad())?;
            let last: usize = last.trim().parse().map_err(|_| bad())?;
            if first > last {
                return Err(bad());
            }
            cpus.extend(first..=last);
        }
        cpus.sort_unstable();
        cpus.dedup();
        Ok(CpuList(cpus))
    }
}

impl std::fmt::Display for CpuList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cpus: Vec<String> = self.0.iter().map(usize::to_string).collect();
        f.write_str(&cpus.join(","))
    }
}

/// Runs this process on `cpus` from now on: this thread, and every thread
/// it starts later (so call it before the runtime starts any).
#[cfg(any(target_os = "linux", target_os = "android"))]
#[allow(unsafe_code)]
pub fn pin(cpus: &CpuList) -> anyhow::Result<()> {
    use std::mem::{size_of, zeroed};
    // SAFETY: cpu_set_t is plain bits, all zero is the empty set, and each
    // call gets the set's own size.
    let allowed = unsafe {
        let mut set: libc::cpu_set_t = zeroed();
        if libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            anyhow::bail!("cannot read which cores this process may use: {}", std::io::Error::last_os_error());
        }
        CpuList((0..libc::CPU_SETSIZE as usize).filter(|&cpu| libc::CPU_ISSET(cpu, &set)).collect())
    };
    if let Some(cpu) = cpus.0.iter().find(|cpu| !allowed.0.contains(cpu)) {
        anyhow::bail!("--cpus {cpus}: there is no core {cpu} for this process; name some of {allowed}");
    }
    // SAFETY: as above; every core in the set was checked to be below CPU_SETSIZE.
    unsafe {
        let mut set: libc::cpu_set_t = zeroed();
        for &cpu in &cpus.0 {
            libc::CPU_SET(cpu, &mut set);
        }
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            anyhow::bail!("cannot keep this node on cores {cpus}: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub fn pin(_: &CpuList) -> anyhow::Result<()> {
    anyhow::bail!("--cpus works on Linux and Android only; leave it out on this system")
}

#[cfg(test)]
mod tests {
    use super::CpuList;

    #[test]
    fn cores_are_listed_and_ranged() {
        assert_eq!("3".parse(), Ok(CpuList(vec![3])));
        assert_eq!("0,2-4,3".parse(), Ok(CpuList(vec![0, 2, 3, 4])));
        assert_eq!(CpuList(vec![0, 2, 3]).to_string(), "0,2,3");
        for bad in ["", "a", "1-", "3-1", "1,,2", "-1"] {
            assert!(bad.parse::<CpuList>().is_err(), "{bad}");
        }
    }
}
