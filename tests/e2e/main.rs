//! End-to-end tests: the `amb-serf` binary against real peers on loopback.

mod agent;
mod ambassador;
mod connect;
mod dns;
mod docker;
mod encryption;
mod environment;
mod etcd;
mod faults;
mod health;
mod health_check;
mod hostile;
mod kernel;
mod modern;
mod proxy;
mod rpc_cli;
mod serf_cli;
mod soak;
mod support;
