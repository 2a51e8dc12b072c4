//! `tensorlet cluster`: the cluster CA's commands, run where the CA's folder is (offline, or
//! on the first node), not against a running node: make the CA, issue a node's certificate
//! (or sign the request a node made with `csr`, so its key never leaves it), revoke one; and
//! `status`, which asks a node who is in its cluster.

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
    /// On the node: make its key and a certificate signing request for <NODE_ID>, written to
    /// --out as node.key (0600) and node.csr; the key never leaves the node.
    Csr {
        node_id: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Where the CA is: sign node <NODE_ID>'s request (--csr), writing node.pem and ca.pem to
    /// --out for the node.
    Sign {
        node_id: String,
        #[arg(long)]
        csr: PathBuf,
        #[arg(long)]
        ca_dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Days it is valid for.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Revoke a node's certificate: rewrites the CA's crl.pem; give it to any node of the
    /// cluster, which passes it on to the others.
    Revoke {
        /// The certificate (PEM) to revoke.
        cert: PathBuf,
        #[arg(long)]
        ca_dir: PathBuf,
    },
    /// Show the members a node knows of: id, node-port address, state, labels.
    Status,
}

impl ClusterCommand {
    /// Whether it runs against a node (else on the CA's folder).
    pub fn needs_node(&self) -> bool {
        matches!(self, ClusterCommand::Status)
    }
}

/// `tensorlet cluster status`.
pub async fn status(client: &super::client::AdminClient) -> anyhow::Result<()> {
    let answer = client.get("/v1/admin/cluster").await?;
    if answer["enabled"] != true {
        println!("this node is in no cluster ([cluster] listen is not set)");
        return Ok(());
    }
    let mut rows = Vec::new();
    for member in answer["members"].as_array().into_iter().flatten() {
        let labels = member["labels"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(key, value)| format!("{key}={}", value.as_str().unwrap_or_default()))
            .collect::<Vec<_>>()
            .join(" ");
        let load = &member["load"];
        let load = match load["max_running"].as_u64() {
            Some(max_running) => format!(
                "{}/{max_running} running, {} queued",
                load["running"], load["queued"]
            ),
            None => "-".to_string(),
        };
        rows.push(vec![
            member["id"].as_str().unwrap_or_default().to_string(),
            member["addr"].as_str().unwrap_or_default().to_string(),
            member["state"].as_str().unwrap_or_default().to_string(),
            load,
            labels,
        ]);
    }
    super::print_table(
        &["MEMBER", "ADDRESS", "STATE", "LOAD", "LABELS"],
        rows.into_iter(),
    );
    Ok(())
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
        ClusterCommand::Csr { node_id, out } => {
            let request = crate::tls::cluster::node_request(&node_id)?;
            crate::store::files::create_private_dir(&out)?;
            let write = crate::store::files::write_durably;
            write(&out.join("node.key"), request.key_pem.as_bytes(), 0o600)?;
            write(&out.join("node.csr"), request.cert_pem.as_bytes(), 0o644)?;
            println!(
                "made node {node_id}'s key and request: have {} signed with `tensorlet cluster sign`",
                out.join("node.csr").display()
            );
        }
        ClusterCommand::Sign {
            node_id,
            csr,
            ca_dir,
            out,
            days,
        } => {
            let ca = ClusterCa::open(&ca_dir)?;
            let cert = ca.sign(
                &std::fs::read_to_string(&csr)?,
                &NodeCert::new(&ca.cluster, &node_id, days),
            )?;
            crate::store::files::create_private_dir(&out)?;
            let write = crate::store::files::write_durably;
            write(&out.join("node.pem"), cert.as_bytes(), 0o644)?;
            write(&out.join("ca.pem"), ca.cert_pem().as_bytes(), 0o644)?;
            println!(
                "signed node {node_id}'s request for {days} days: {} (with ca.pem)",
                out.join("node.pem").display()
            );
        }
        ClusterCommand::Status => unreachable!("status runs against a node"),
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
