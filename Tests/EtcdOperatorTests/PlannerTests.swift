import Testing
@testable import EtcdOperator

/// The planner's next action for each situation of the safe sequences (learner first, one change
/// at a time, leader last, new identities for lost data), and whole sequences played on a model.
struct PlannerTests {
    static let v1 = "v1"
    static let v2 = "v2"

    static func member(_ id: UInt64, learner: Bool = false, healthy: Bool = true, leader: Bool = false, applied: UInt64 = 100,
                       boot: Bool = false) -> ObservedMember {
        ObservedMember(id: id, name: boot ? "boot" : "member-\(id)", isLearner: learner, healthy: healthy, isLeader: leader,
                       appliedIndex: applied, isBootMember: boot)
    }

    static func running(_ ids: [UInt64], version: String = v1) -> [ObservedWorkload] {
        ids.map { ObservedWorkload(name: "member-\($0)", version: version) }
    }

    static let three = [member(0, leader: true), member(1), member(2)]

    @Test func aSteadyClusterNeedsNothing() {
        #expect(Planner.next(DesiredCluster(size: 3, version: Self.v1), Observation(members: Self.three, workloads: Self.running([0, 1, 2]))) == .steady)
    }

    @Test func scalingUpAddsALearnerThenPromotesItOnceCaughtUp() {
        let desired = DesiredCluster(size: 4, version: Self.v1)
        #expect(Planner.next(desired, Observation(members: Self.three, workloads: Self.running([0, 1, 2]))) == .addLearner(name: "member-3"))
        // Added but not started (the operator crashed in between): start it.
        let added = Self.three + [Self.member(3, learner: true, healthy: false, applied: 0)]
        #expect(Planner.next(desired, Observation(members: added, workloads: Self.running([0, 1, 2]))) == .startMember(name: "member-3"))
        #expect(Planner.next(desired, Observation(members: added, workloads: Self.running([0, 1, 2, 3])))
                == .wait("learner member-3 is catching up"))
        let caughtUp = Self.three + [Self.member(3, learner: true, applied: 100)]
        #expect(Planner.next(desired, Observation(members: caughtUp, workloads: Self.running([0, 1, 2, 3]))) == .promote(id: 3))
        // One that never catches up is removed.
        #expect(Planner.next(desired, Observation(members: added, workloads: Self.running([0, 1, 2, 3]), stalledLearners: [3]))
                == .removeMember(id: 3, via: 0))
    }

    @Test func scalingDownMovesLeadershipFirstAndRemovesThroughAnotherMember() {
        let desired = DesiredCluster(size: 2, version: Self.v1)
        #expect(Planner.next(desired, Observation(members: Self.three, workloads: Self.running([0, 1, 2]))) == .removeMember(id: 2, via: 0))
        // Only the leader is left to remove: it hands leadership over first.
        let desiredOne = DesiredCluster(size: 1, version: Self.v1)
        let two = [Self.member(0), Self.member(1, leader: true)]
        #expect(Planner.next(desiredOne, Observation(members: [Self.member(0, leader: true), Self.member(1)], workloads: Self.running([0, 1])))
                == .removeMember(id: 1, via: 0))
        #expect(Planner.next(DesiredCluster(size: 1, version: Self.v1), Observation(members: two, workloads: Self.running([0, 1])))
                == .removeMember(id: 0, via: 1))
        // The removed member's workload goes, with its data.
        #expect(Planner.next(desired, Observation(members: Array(Self.three.prefix(2)), workloads: Self.running([0, 1, 2])))
                == .deleteWorkload(name: "member-2"))
    }

    @Test func aMemberOnIntactDataRestartsInPlace() {
        var workloads = Self.running([0, 1, 2])
        workloads[1].state = .stopped
        let members = [Self.member(0, leader: true), Self.member(1, healthy: false), Self.member(2)]
        #expect(Planner.next(DesiredCluster(size: 3, version: Self.v1), Observation(members: members, workloads: workloads)) == .restartInPlace(name: "member-1"))
    }

    @Test func aMemberWhoseDataIsLostIsRemovedAndReplacedUnderANewIdentity() {
        let desired = DesiredCluster(size: 3, version: Self.v1)
        var workloads = Self.running([0, 1, 2])
        workloads[2].state = .dataLost
        let members = [Self.member(0, leader: true), Self.member(1), Self.member(2, healthy: false)]
        #expect(Planner.next(desired, Observation(members: members, workloads: workloads)) == .removeMember(id: 2, via: 0))
        // Two lost at once out of three: removing one would leave one healthy voter of two, no
        // quorum; the operator waits (quorum is already gone; recovery is a restore).
        var two = workloads
        two[1].state = .dataLost
        let twoDown = [Self.member(0, leader: true), Self.member(1, healthy: false), Self.member(2, healthy: false)]
        if case .wait = Planner.next(desired, Observation(members: twoDown, workloads: two)) {} else { Issue.record("expected a wait") }
    }

    @Test func withoutQuorumMembersComeBackOnTheirDataOrFromASnapshot() {
        let desired = DesiredCluster(size: 3, version: Self.v1)
        var stopped = Self.running([0, 1, 2])
        for i in stopped.indices { stopped[i].state = .stopped }
        #expect(Planner.next(desired, Observation(members: nil, workloads: stopped)) == .restartInPlace(name: "member-0"))
        var lost = stopped
        for i in lost.indices { lost[i].state = .dataLost }
        #expect(Planner.next(desired, Observation(members: nil, workloads: lost)) == .restoreFromSnapshot)
        #expect(Planner.next(desired, Observation(members: nil, workloads: [])) == .restoreFromSnapshot)
        // Two of three running on their data: they make a quorum once they find each other.
        var twoUp = stopped
        twoUp[0].state = .running
        twoUp[1].state = .running
        twoUp[2].state = .dataLost
        #expect(Planner.next(desired, Observation(members: nil, workloads: twoUp)) == .wait("members are starting"))
        // One survivor of three, the other two lost: no quorum of data will ever come back; the
        // cluster is re-seeded (from the survivor's store, which the reconciler prefers).
        var oneUp = lost
        oneUp[0].state = .running
        #expect(Planner.next(desired, Observation(members: nil, workloads: oneUp)) == .restoreFromSnapshot)
        // ... but a survivor's stopped peer comes back first.
        oneUp[1].state = .stopped
        #expect(Planner.next(desired, Observation(members: nil, workloads: oneUp)) == .restartInPlace(name: "member-1"))
    }

    /// Without a quorum, the yardstick is the voters last seen: during a pivot the boot member
    /// (no workload of ours) counts as a voter with its data, so one lost member of three is
    /// waited out, not re-seeded; a learner lost on top changes nothing.
    @Test func withoutQuorumTheLastVotersDecideBetweenWaitingAndReseeding() {
        let desired = DesiredCluster(size: 3, version: Self.v1)
        var workloads = Self.running([0, 1])
        workloads[0].state = .dataLost
        let voters = ["boot", "member-0", "member-1"]
        #expect(Planner.next(desired, Observation(members: nil, workloads: workloads, lastVoters: voters)) == .wait("members are starting"))
        // Without that memory, one of the two workloads with data would look like no majority.
        #expect(Planner.next(desired, Observation(members: nil, workloads: workloads)) == .restoreFromSnapshot)
        // Two of three voters lost: re-seed.
        workloads[1].state = .dataLost
        #expect(Planner.next(desired, Observation(members: nil, workloads: workloads, lastVoters: voters)) == .restoreFromSnapshot)
        // Never a quorum, something started: wait for it rather than start another cluster.
        #expect(Planner.next(desired, Observation(members: nil, workloads: Self.running([0]), lastVoters: [])) == .wait("members are starting"))
        // The platform's view missing: nothing is done at all.
        #expect(Planner.next(desired, Observation(members: nil, workloads: [], platformAnswered: false)) == .wait("the platform did not answer"))
    }

    /// A rolling upgrade waits for the member restarted last to catch up with the leader.
    @Test func aRestoreAskedForComesFirstAndOnlyOnce() {
        var desired = DesiredCluster(size: 3, version: Self.v1)
        desired.restore = RestoreRequest(id: "r1", snapshot: "/backups/s.db")
        let healthy = Observation(members: Self.three, workloads: Self.running([0, 1, 2]))
        #expect(Planner.next(desired, healthy) == .restore(id: "r1", snapshot: "/backups/s.db"))
        // Also before an upgrade, and without a quorum.
        var upgrading = desired
        upgrading.version = Self.v2
        #expect(Planner.next(upgrading, healthy) == .restore(id: "r1", snapshot: "/backups/s.db"))
        #expect(Planner.next(desired, Observation(members: nil, workloads: Self.running([0, 1, 2]))) == .restore(id: "r1", snapshot: "/backups/s.db"))
        // Done: the cluster is planned as usual; a new id asks again.
        var done = healthy
        done.restoresDone = ["r1"]
        #expect(Planner.next(desired, done) == .steady)
        desired.restore?.id = "r2"
        #expect(Planner.next(desired, done) == .restore(id: "r2", snapshot: "/backups/s.db"))
        // Not while the platform cannot be asked.
        #expect(Planner.next(desired, Observation(members: Self.three, workloads: [], platformAnswered: false)) == .wait("the platform did not answer"))
    }

    @Test func anUpgradeWaitsForTheRestartedMemberToCatchUp() {
        let desired = DesiredCluster(size: 3, version: Self.v2)
        var workloads = Self.running([0, 1, 2])
        workloads[1].version = Self.v2
        var members = [Self.member(0, leader: true), Self.member(1), Self.member(2)]
        members[0].appliedIndex = 50_000
        members[1].appliedIndex = 10
        members[2].appliedIndex = 50_000
        #expect(Planner.next(desired, Observation(members: members, workloads: workloads)) == .wait("member-1 is catching up"))
        members[1].appliedIndex = 49_990
        #expect(Planner.next(desired, Observation(members: members, workloads: workloads)) == .upgrade(name: "member-2", to: Self.v2))
    }

    @Test func anUnhealthyVoterBlocksMembershipChanges() {
        let members = [Self.member(0, leader: true), Self.member(1), Self.member(2, healthy: false)]
        #expect(Planner.next(DesiredCluster(size: 5, version: Self.v1), Observation(members: members, workloads: Self.running([0, 1, 2])))
                == .wait("a voter is unhealthy"))
    }

    @Test func theBootMemberLeavesOnlyWhenThreeSelfHostedMembersHoldAQuorum() {
        let desired = DesiredCluster(size: 3, version: Self.v1)
        let boot = Self.member(9, leader: true, boot: true)
        #expect(Planner.next(desired, Observation(members: [boot], workloads: [])) == .addLearner(name: "member-0"))
        #expect(Planner.next(desired, Observation(members: [boot, Self.member(0), Self.member(1)], workloads: Self.running([0, 1])))
                == .addLearner(name: "member-2"))
        let full = [boot, Self.member(0), Self.member(1), Self.member(2)]
        #expect(Planner.next(desired, Observation(members: full, workloads: Self.running([0, 1, 2]))) == .moveLeader(to: 0))
        let handedOver = [Self.member(9, boot: true), Self.member(0, leader: true), Self.member(1), Self.member(2)]
        #expect(Planner.next(desired, Observation(members: handedOver, workloads: Self.running([0, 1, 2]))) == .removeMember(id: 9, via: 0))
    }

    @Test func upgradesGoFollowersFirstLeaderLastAndNeedThreeMembers() {
        let desired = DesiredCluster(size: 3, version: "v2")
        var workloads = Self.running([0, 1, 2])
        #expect(Planner.next(desired, Observation(members: Self.three, workloads: workloads)) == .upgrade(name: "member-1", to: "v2"))
        workloads[1].version = "v2"
        workloads[2].version = "v2"
        #expect(Planner.next(desired, Observation(members: Self.three, workloads: workloads)) == .moveLeader(to: 1))
        let moved = [Self.member(0), Self.member(1, leader: true), Self.member(2)]
        #expect(Planner.next(desired, Observation(members: moved, workloads: workloads)) == .upgrade(name: "member-0", to: "v2"))
        let small = DesiredCluster(size: 1, version: "v2")
        if case .wait = Planner.next(small, Observation(members: [Self.member(0, leader: true)], workloads: Self.running([0]))) {} else {
            Issue.record("a one-member upgrade was planned")
        }
    }

    /// A model cluster that carries actions out; the planner drives it from the boot member to
    /// three, five, three members and through an upgrade. Checked at every step: one membership
    /// change at a time, voters never below a healthy quorum, the boot member gone only after
    /// three self-hosted voters.
    @Test func wholeSequencesReachTheirGoalSafely() {
        var model = Model()
        for (size, version) in [(3, "v1"), (5, "v1"), (3, "v1"), (3, "v2")] {
            let desired = DesiredCluster(size: size, version: version)
            var steps = 0
            while steps < 100 {
                let action = Planner.next(desired, model.observation)
                if action == .steady { break }
                model.apply(action)
                #expect(model.invariantsHold, "after \(action): \(model)")
                steps += 1
            }
            #expect(steps < 100, "no steady state for size \(size) \(version)")
            #expect(model.members.filter { !$0.isLearner && !$0.isBootMember }.count == size)
            #expect(model.workloads.allSatisfy { $0.version == version })
            #expect(!model.members.contains { $0.isBootMember })
        }
    }

    /// A StatefulSet's members (`etcdlite-N`): a new member takes the lowest free ordinal (the
    /// pod whose claim was lost comes back under its name with a new ID), and a scale-down takes
    /// the highest ordinal, leader or not, leadership moved away first.
    @Test func aStatefulSetsMembersFollowTheOrdinals() {
        var desired = DesiredCluster(size: 3, version: Self.v1)
        desired.namePrefix = "etcdlite"
        desired.ordinalScaleDown = true
        func member(_ n: UInt64, leader: Bool = false) -> ObservedMember {
            ObservedMember(id: 10 + n, name: "etcdlite-\(n)", isLearner: false, healthy: true, isLeader: leader, appliedIndex: 100)
        }
        func running(_ ns: [UInt64]) -> [ObservedWorkload] { ns.map { ObservedWorkload(name: "etcdlite-\($0)", version: Self.v1) } }
        // etcdlite-1 was removed (its claim was lost): it is added again, not etcdlite-3.
        #expect(Planner.next(desired, Observation(members: [member(0, leader: true), member(2)], workloads: running([0, 2])))
                == .addLearner(name: "etcdlite-1"))
        // Five down to three: etcdlite-4 first, though etcdlite-1 would be the usual pick.
        desired.size = 3
        let five = [member(0), member(1), member(2), member(3), member(4)]
        #expect(Planner.next(desired, Observation(members: five.map { m in var m = m; m.isLeader = m.id == 10; return m }, workloads: running([0, 1, 2, 3, 4])))
                == .removeMember(id: 14, via: 10))
        // The highest ordinal leads: leadership moves first.
        #expect(Planner.next(desired, Observation(members: five.map { m in var m = m; m.isLeader = m.id == 14; return m }, workloads: running([0, 1, 2, 3, 4])))
                == .moveLeader(to: 10))
    }
}

/// Members and workloads that follow actions at once (learners catch up when started).
struct Model: CustomStringConvertible {
    var members = [ObservedMember(id: 99, name: "boot", isLeader: true, appliedIndex: 10, isBootMember: true)]
    var workloads: [ObservedWorkload] = []
    var nextID: UInt64 = 1

    var observation: Observation { Observation(members: members, workloads: workloads) }
    var description: String { "\(members.map { "\($0.name)\($0.isLearner ? "(l)" : "")\($0.isLeader ? "*" : "")" }) \(workloads.map(\.name))" }

    var invariantsHold: Bool {
        let voters = members.filter { !$0.isLearner }
        return members.filter(\.isLearner).count <= 1 && voters.filter(\.healthy).count >= voters.count / 2 + 1
            && members.filter(\.isLeader).count == 1
    }

    mutating func apply(_ action: PlannedAction) {
        switch action {
        case .addLearner(let name):
            members.append(ObservedMember(id: nextID, name: name, isLearner: true, healthy: false, appliedIndex: 0))
            nextID += 1
        case .startMember(let name), .restartInPlace(let name):
            if let i = workloads.firstIndex(where: { $0.name == name }) { workloads[i].state = .running } else {
                workloads.append(ObservedWorkload(name: name, version: workloads.first?.version ?? "v1"))
            }
            if let i = members.firstIndex(where: { $0.name == name }) {
                members[i].healthy = true
                members[i].appliedIndex = 10
            }
        case .promote(let id):
            if let i = members.firstIndex(where: { $0.id == id }) { members[i].isLearner = false }
        case .moveLeader(let id):
            for i in members.indices { members[i].isLeader = members[i].id == id }
        case .removeMember(let id, _):
            members.removeAll { $0.id == id }
        case .deleteWorkload(let name):
            workloads.removeAll { $0.name == name }
        case .upgrade(let name, let version):
            if let i = workloads.firstIndex(where: { $0.name == name }) { workloads[i].version = version }
        case .restoreFromSnapshot, .restore, .wait, .steady:
            break
        }
    }
}
