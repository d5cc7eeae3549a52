//! Generated protobuf and gRPC code, in modules that mirror the proto packages (the generated
//! code refers to other packages by relative paths).

#![allow(clippy::all, clippy::pedantic, missing_docs)]

pub mod common {
    pub mod v1 {
        tonic::include_proto!("common.v1");
    }
    pub mod v2 {
        tonic::include_proto!("common.v2");
    }
}

pub mod servicemanager {
    pub mod v5 {
        tonic::include_proto!("servicemanager.v5");
    }
}

pub mod iamanager {
    pub mod v6 {
        tonic::include_proto!("iamanager.v6");
    }
}

pub mod communicationmanager {
    pub mod v3 {
        tonic::include_proto!("communicationmanager.v3");
    }
}
