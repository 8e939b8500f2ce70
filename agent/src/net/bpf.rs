//! The classic BPF program the receive socket runs in the kernel, so that
//! only TCP SYN-ACKs and RSTs addressed to our source port are ever copied
//! to user space. The program reads packets from the network header on
//! (an AF_PACKET SOCK_DGRAM socket), IPv4 and IPv6 alike.

use super::sys::BpfInsn;

// Opcodes from <linux/filter.h>.
const LD_B_ABS: u16 = 0x30;
const LD_H_ABS: u16 = 0x28;
const LD_B_IND: u16 = 0x50;
const LD_H_IND: u16 = 0x48;
const LDX_B_MSH: u16 = 0xb1;
const ALU_RSH_K: u16 = 0x74;
const ALU_AND_K: u16 = 0x54;
const JMP_JA: u16 = 0x05;
const JMP_JEQ_K: u16 = 0x15;
const JMP_JSET_K: u16 = 0x45;
const RET_K: u16 = 0x06;

#[derive(Clone, Copy)]
enum Target {
    Next,
    To(&'static str),
}

enum Op {
    Stmt(u16, u32),
    Jump(u16, u32, Target, Target),
    Goto(&'static str),
    At(&'static str),
}

/// Accepts TCP segments to `dst_port` with RST set, or with SYN and ACK
/// set; returns up to `snap` bytes of each.
pub fn reply_filter(dst_port: u16, snap: u32) -> Vec<BpfInsn> {
    use Op::*;
    use Target::*;
    let port = u32::from(dst_port);
    let ops = [
        Stmt(LD_B_ABS, 0),
        Stmt(ALU_RSH_K, 4),
        Jump(JMP_JEQ_K, 4, To("v4"), Next),
        Jump(JMP_JEQ_K, 6, To("v6"), To("drop")),
        At("v4"),
        Stmt(LD_B_ABS, 9),
        Jump(JMP_JEQ_K, 6, Next, To("drop")),
        // Fragments other than the first carry no TCP header.
        Stmt(LD_H_ABS, 6),
        Jump(JMP_JSET_K, 0x1fff, To("drop"), Next),
        // X = IPv4 header length.
        Stmt(LDX_B_MSH, 0),
        Stmt(LD_H_IND, 2),
        Jump(JMP_JEQ_K, port, Next, To("drop")),
        Stmt(LD_B_IND, 13),
        Goto("flags"),
        At("v6"),
        // Extension headers are not followed: scanned hosts answer without.
        Stmt(LD_B_ABS, 6),
        Jump(JMP_JEQ_K, 6, Next, To("drop")),
        Stmt(LD_H_ABS, 42),
        Jump(JMP_JEQ_K, port, Next, To("drop")),
        Stmt(LD_B_ABS, 53),
        At("flags"),
        Jump(JMP_JSET_K, 0x04, To("accept"), Next),
        Stmt(ALU_AND_K, 0x12),
        Jump(JMP_JEQ_K, 0x12, To("accept"), To("drop")),
        At("accept"),
        Stmt(RET_K, snap),
        At("drop"),
        Stmt(RET_K, 0),
    ];
    assemble(&ops)
}

fn assemble(ops: &[Op]) -> Vec<BpfInsn> {
    // Instruction index of each label.
    let mut labels = std::collections::HashMap::new();
    let mut pc = 0usize;
    for op in ops {
        match op {
            Op::At(name) => {
                labels.insert(*name, pc);
            }
            _ => pc += 1,
        }
    }
    let rel = |from: usize, t: Target| -> u8 {
        match t {
            Target::Next => 0,
            // The programs here are short: every offset fits in a byte.
            Target::To(l) => (labels[l] - from - 1) as u8,
        }
    };
    let mut out = Vec::with_capacity(pc);
    for op in ops {
        let pc = out.len();
        match *op {
            Op::Stmt(code, k) => out.push(BpfInsn { code, jt: 0, jf: 0, k }),
            Op::Jump(code, k, jt, jf) => out.push(BpfInsn { code, jt: rel(pc, jt), jf: rel(pc, jf), k }),
            Op::Goto(l) => out.push(BpfInsn { code: JMP_JA, jt: 0, jf: 0, k: (labels[l] - pc - 1) as u32 }),
            Op::At(_) => {}
        }
    }
    out
}

/// Runs a program the way the kernel would (for the opcodes used above);
/// out-of-bounds loads reject, as in the kernel.
#[cfg(test)]
fn run(prog: &[BpfInsn], pkt: &[u8]) -> u32 {
    let (mut a, mut x, mut pc) = (0u32, 0u32, 0usize);
    let byte = |off: usize| pkt.get(off).map(|&b| u32::from(b));
    let half = |off: usize| Some(u32::from(u16::from_be_bytes([*pkt.get(off)?, *pkt.get(off + 1)?])));
    loop {
        let i = prog[pc];
        pc += 1;
        match i.code {
            LD_B_ABS => {
                a = match byte(i.k as usize) {
                    Some(v) => v,
                    None => return 0,
                }
            }
            LD_H_ABS => {
                a = match half(i.k as usize) {
                    Some(v) => v,
                    None => return 0,
                }
            }
            LD_B_IND => {
                a = match byte((x + i.k) as usize) {
                    Some(v) => v,
                    None => return 0,
                }
            }
            LD_H_IND => {
                a = match half((x + i.k) as usize) {
                    Some(v) => v,
                    None => return 0,
                }
            }
            LDX_B_MSH => {
                x = match byte(i.k as usize) {
                    Some(v) => (v & 0xf) * 4,
                    None => return 0,
                }
            }
            ALU_RSH_K => a >>= i.k,
            ALU_AND_K => a &= i.k,
            JMP_JA => pc += i.k as usize,
            JMP_JEQ_K => pc += usize::from(if a == i.k { i.jt } else { i.jf }),
            JMP_JSET_K => pc += usize::from(if a & i.k != 0 { i.jt } else { i.jf }),
            RET_K => return i.k,
            other => panic!("opcode {other:#x} not emulated"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::net::packet::{MAX_PROBE_LEN, ProbeTemplate, TCP_ACK, TCP_RST, TCP_SYN};

    /// A reply from `src:sport` to our `dst_port`, built by swapping a probe.
    fn reply(src: &str, dst_port: u16, flags: u8) -> Vec<u8> {
        let src: IpAddr = src.parse().unwrap();
        let t = ProbeTemplate {
            src_v4: Some("10.9.9.9".parse().unwrap()),
            src_v6: Some("2001:db8::9".parse().unwrap()),
            other_sources: Vec::new(),
            src_port: 80,
        };
        let mut buf = [0u8; MAX_PROBE_LEN];
        let n = t.write_syn(&mut buf, None, src, dst_port, 1).unwrap();
        let tcp = if src.is_ipv4() { 20 } else { 40 };
        buf[tcp + 13] = flags;
        buf[..n].to_vec()
    }

    #[test]
    fn accepts_only_replies_to_our_port() {
        let prog = reply_filter(40000, 128);
        for src in ["10.0.0.1", "2001:db8::1"] {
            assert_eq!(run(&prog, &reply(src, 40000, TCP_SYN | TCP_ACK)), 128, "syn-ack from {src}");
            assert_eq!(run(&prog, &reply(src, 40000, TCP_RST | TCP_ACK)), 128, "rst from {src}");
            assert_eq!(run(&prog, &reply(src, 40000, TCP_SYN)), 0, "bare syn from {src}");
            assert_eq!(run(&prog, &reply(src, 40000, TCP_ACK)), 0, "bare ack from {src}");
            assert_eq!(run(&prog, &reply(src, 40001, TCP_SYN | TCP_ACK)), 0, "other port from {src}");
        }
        let mut udp = reply("10.0.0.1", 40000, TCP_SYN | TCP_ACK);
        udp[9] = 17;
        assert_eq!(run(&prog, &udp), 0);
        let mut frag = reply("10.0.0.1", 40000, TCP_SYN | TCP_ACK);
        frag[7] = 1;
        assert_eq!(run(&prog, &frag), 0);
        assert_eq!(run(&prog, &[0x45, 0, 0]), 0);
        assert_eq!(run(&prog, &[]), 0);
    }
}
