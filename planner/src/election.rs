//! Leader election among the live trusted members of a mesh, as a pure
//! state machine the node's planning actor drives.
//!
//! A leadership is a `(term, leader)` pair. A leader stays while it is live.
//! When the leader leaves, a member starts term + 1 with the smallest live id
//! as leader, and announces it. A member that has followed no leader yet
//! first listens: the members it meets tell it whom they follow, and it calls
//! an election ([`Election::elect`]) only if none has after a grace period,
//! so a device that joins a mesh does not unseat its leader, whatever its id.
//! Between two leaderships the higher term wins, and within a term the
//! smaller id, so every member that hears the same announcements settles on
//! the same leader, whatever order they arrive in; when two partitions merge,
//! the one with the higher term keeps its leader. Ids are compared as strings
//! (peer ids).

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// Who leads, and since which term.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Leadership {
    pub term: u64,
    pub leader: String,
}

impl Leadership {
    /// Whether `self` wins over `other`: higher term, then smaller id.
    pub fn beats(&self, other: &Leadership) -> bool {
        (self.term, std::cmp::Reverse(&self.leader)) > (other.term, std::cmp::Reverse(&other.leader))
    }
}

#[derive(Clone, Debug)]
pub struct Election {
    me: String,
    live: BTreeSet<String>,
    current: Option<Leadership>,
    /// The best announcement naming a leader this member has not met yet: it
    /// is followed once that leader is live (a member may hear of the leader
    /// from a follower before it meets the leader itself).
    heard: Option<Leadership>,
}

impl Election {
    pub fn new(me: &str) -> Election {
        Election { me: me.to_string(), live: BTreeSet::new(), current: None, heard: None }
    }

    pub fn current(&self) -> Option<&Leadership> {
        self.current.as_ref()
    }

    pub fn is_leader(&self) -> bool {
        self.current.as_ref().is_some_and(|l| l.leader == self.me)
    }

    pub fn live(&self) -> &BTreeSet<String> {
        &self.live
    }

    fn is_live(&self, id: &str) -> bool {
        id == self.me || self.live.contains(id)
    }

    /// The set of live members (not counting this one) changed. A leader
    /// heard of before it was met is followed once it is live. Returns a new
    /// leadership to announce when the leader followed is gone; a member that
    /// follows none yet waits to hear of one ([`Election::elect`]).
    pub fn members(&mut self, live: BTreeSet<String>) -> Option<Leadership> {
        self.live = live;
        self.live.remove(&self.me);
        if let Some(heard) = self.heard.take() {
            self.announced(heard);
        }
        match &self.current {
            Some(current) if !self.is_live(&current.leader) => self.elect(),
            _ => None,
        }
    }

    /// A leader a member named that this member has not met yet, if it would follow it.
    pub fn heard(&self) -> Option<&Leadership> {
        self.heard.as_ref()
    }

    /// Whether no live leader is followed: [`Election::elect`] would start a term.
    pub fn leaderless(&self) -> bool {
        self.current.as_ref().is_none_or(|l| !self.is_live(&l.leader))
    }

    /// Starts term + 1 with the smallest live id (this member's included) as
    /// leader, when no live leader is followed; returns it, to announce.
    pub fn elect(&mut self) -> Option<Leadership> {
        if !self.leaderless() {
            return None;
        }
        let term = self.current.as_ref().map_or(0, |l| l.term) + 1;
        let leader =
            self.live.iter().next().filter(|first| **first < self.me).cloned().unwrap_or_else(|| self.me.clone());
        let next = Leadership { term, leader };
        self.current = Some(next.clone());
        Some(next)
    }

    /// A member announced a leadership. Returns true when this member now
    /// follows it. One naming a leader this member cannot see is kept until
    /// that leader is live, if it would win then; it is not followed before:
    /// this member announces its own when its leader leaves, which the others
    /// weigh in turn.
    pub fn announced(&mut self, announced: Leadership) -> bool {
        if self.current.as_ref().is_some_and(|current| !announced.beats(current)) {
            return false;
        }
        if !self.is_live(&announced.leader) {
            if self.heard.as_ref().is_none_or(|heard| announced.beats(heard)) {
                self.heard = Some(announced);
            }
            return false;
        }
        self.current = Some(announced);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ids: &[&str]) -> BTreeSet<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    /// Members exchanging every announcement until nothing changes.
    fn settle(nodes: &mut [Election], links: &[(usize, usize)]) {
        loop {
            let mut changed = false;
            for &(a, b) in links {
                for (from, to) in [(a, b), (b, a)] {
                    if let Some(l) = nodes[from].current().cloned() {
                        changed |= nodes[to].announced(l);
                    }
                }
            }
            if !changed {
                return;
            }
        }
    }

    /// Three fresh members that all meet: each sees the others, in its own
    /// order, before any announcement, calls an election once it has heard
    /// of no leader, and they settle.
    fn three(ids: [&str; 3]) -> Vec<Election> {
        let mut nodes: Vec<Election> = ids.iter().map(|id| Election::new(id)).collect();
        for n in &mut nodes {
            assert_eq!(n.members(set(&ids)), None);
            assert!(n.elect().is_some());
        }
        settle(&mut nodes, &[(0, 1), (1, 2), (0, 2)]);
        nodes
    }

    #[test]
    fn three_members_agree_on_the_smallest_id() {
        let nodes = three(["c", "a", "b"]);
        for n in &nodes {
            assert_eq!(n.current(), Some(&Leadership { term: 1, leader: "a".into() }));
        }
        assert!(nodes[1].is_leader() && !nodes[0].is_leader());
    }

    #[test]
    fn a_departed_leader_is_replaced_in_a_higher_term() {
        let mut nodes = three(["a", "b", "c"]);
        // "a" leaves; "b" and "c" notice at different times.
        let new = nodes[2].members(set(&["b"])).unwrap();
        assert_eq!(new, Leadership { term: 2, leader: "b".into() });
        assert_eq!(nodes[1].members(set(&["c"])), Some(new.clone()));
        settle(&mut nodes[1..], &[(0, 1)]);
        assert_eq!(nodes[1].current(), Some(&new));
        // A new member does not unseat a live leader, even with a smaller id.
        assert_eq!(nodes[1].members(set(&["c", "0"])), None);
        assert_eq!(nodes[1].current(), Some(&new));
    }

    #[test]
    fn when_partitions_merge_the_higher_term_wins() {
        // Partition one went through three leaders; partition two through one.
        let mut one = Election::new("m");
        one.announced(Leadership { term: 3, leader: "m".into() });
        let mut two = Election::new("b");
        two.members(set(&["z"]));
        two.elect();
        assert_eq!(two.current().unwrap().term, 1);
        one.members(set(&["b", "z"]));
        two.members(set(&["m", "z"]));
        let mut nodes = vec![one, two];
        settle(&mut nodes, &[(0, 1)]);
        assert_eq!(nodes[1].current(), Some(&Leadership { term: 3, leader: "m".into() }));
        assert_eq!(nodes[0].current(), Some(&Leadership { term: 3, leader: "m".into() }));
    }

    #[test]
    fn announcements_of_unseen_or_older_leaders_are_ignored() {
        let mut e = Election::new("b");
        e.members(set(&["c"]));
        e.elect();
        assert!(!e.announced(Leadership { term: 9, leader: "ghost".into() }));
        assert!(!e.announced(Leadership { term: 0, leader: "c".into() }));
        assert!(e.announced(Leadership { term: 2, leader: "c".into() }));
        assert!(!e.is_leader());
        // The unseen leader is followed once it is met: the mesh it leads has the higher term.
        assert_eq!(e.members(set(&["c", "ghost"])), None);
        assert_eq!(e.current(), Some(&Leadership { term: 9, leader: "ghost".into() }));
    }

    #[test]
    fn a_device_that_joins_follows_the_leader_whatever_its_id() {
        let mut nodes = three(["b", "c", "d"]);
        let mesh = Leadership { term: 1, leader: "b".into() };
        // "a" has the smallest id. It meets "c" first, which names the leader
        // it has not met yet; it calls no election meanwhile.
        let mut newcomer = Election::new("a");
        assert_eq!(newcomer.members(set(&["c"])), None);
        assert_eq!(nodes[1].members(set(&["a", "b", "d"])), None);
        assert!(!newcomer.announced(nodes[1].current().unwrap().clone()));
        assert!(newcomer.leaderless());
        assert_eq!(newcomer.heard(), Some(&mesh));
        // Then it meets the leader, and follows it.
        assert_eq!(newcomer.members(set(&["b", "c"])), None);
        assert_eq!(newcomer.current(), Some(&mesh));
        assert_eq!(newcomer.elect(), None);
        assert_eq!(nodes[0].members(set(&["a", "c", "d"])), None);
        nodes.push(newcomer);
        settle(&mut nodes, &[(0, 3), (1, 3), (2, 3)]);
        assert!(nodes.iter().all(|n| n.current() == Some(&mesh)), "{nodes:?}");
        assert!(!nodes[3].is_leader());
    }
}
