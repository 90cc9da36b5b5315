//! Generated gRPC types for every Cirrus service, one module per proto package
//! and version (`identity::v1`, ...), and the descriptor set that servers
//! register for gRPC reflection so any client can discover them.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

/// Every message and service of every Cirrus proto, encoded as a
/// `google.protobuf.FileDescriptorSet`.
pub mod codec;

pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptor.bin"));

pub mod identity {
    pub mod v1 {
        tonic::include_proto!("identity.v1");
    }
}

pub mod image {
    pub mod v1 {
        tonic::include_proto!("image.v1");
    }
}

pub mod queue {
    pub mod v1 {
        tonic::include_proto!("queue.v1");
    }
}

pub mod network {
    pub mod v1 {
        tonic::include_proto!("network.v1");
    }
}

pub mod volume {
    pub mod v1 {
        tonic::include_proto!("volume.v1");
    }
}

pub mod compute {
    pub mod v1 {
        tonic::include_proto!("compute.v1");
    }
}

pub mod scheduler {
    pub mod v1 {
        tonic::include_proto!("scheduler.v1");
    }
}

pub mod conductor {
    pub mod v1 {
        tonic::include_proto!("conductor.v1");
    }
}
