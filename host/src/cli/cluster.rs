//! `tensorlet cluster`: the cluster CA's commands, run where the CA's folder is (offline, or
//! on the first node), not against a running node: make the CA, issue a node's certificate,
//! revoke one.

use crate::tls::cluster::{ClusterCa, NodeCert};
use clap::Subcommand;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum ClusterCommand {
    /// Make the cluster CA in --ca-dir (its key is written 0600; keep it offline).
    Init {
        /// The cluster's name: its certificates say `spiffe://<name>/node/<id>`.
        #[arg(long)]
        name: String,
        #[arg(long)]
        ca_dir: PathBuf,
    },
    /// Issue node <NODE_ID> a certificate: writes node.pem, node.key (0600) and ca.pem to --out.
    Issue {
        node_id: String,
        #[arg(long)]
        ca_dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Days it is valid for.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Revoke a node's certificate: rewrites the CA's crl.pem, which every node's
    /// `[cluster] crl` must then be given.
    Revoke {
        /// The certificate (PEM) to revoke.
        cert: PathBuf,
        #[arg(long)]
        ca_dir: PathBuf,
    },
}

pub fn run(command: ClusterCommand) -> anyhow::Result<()> {
    match command {
        ClusterCommand::Init { name, ca_dir } => {
            ClusterCa::init(&ca_dir, &name)?;
            println!(
                "made the CA of cluster {name} in {} (keep ca.key offline)",
                ca_dir.display()
            );
        }
        ClusterCommand::Issue {
            node_id,
            ca_dir,
            out,
            days,
        } => {
            let ca = ClusterCa::open(&ca_dir)?;
            let issued = ca.issue(&NodeCert::new(&ca.cluster, &node_id, days))?;
            crate::store::files::create_private_dir(&out)?;
            let write = crate::store::files::write_durably;
            write(&out.join("node.key"), issued.key_pem.as_bytes(), 0o600)?;
            write(&out.join("node.pem"), issued.cert_pem.as_bytes(), 0o644)?;
            write(&out.join("ca.pem"), ca.cert_pem().as_bytes(), 0o644)?;
            println!(
                "issued node {node_id} of cluster {} a certificate for {days} days: {}",
                ca.cluster,
                out.display()
            );
        }
        ClusterCommand::Revoke { cert, ca_dir } => {
            let ca = ClusterCa::open(&ca_dir)?;
            let crl = ca.revoke(&std::fs::read_to_string(&cert)?)?;
            println!(
                "revoked {}; give every node the new CRL: {}",
                cert.display(),
                crl.display()
            );
        }
    }
    Ok(())
}
