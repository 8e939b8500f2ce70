//! Reflection (v1 and v1alpha) and health, as grpcurl would use them.

use portfleet_tests::{TestController, TestDb};
use tokio_stream::StreamExt;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
use tonic_reflection::pb::{v1, v1alpha};

const EXPECTED: [&str; 3] =
    ["grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection", "portfleet.v1.ScanService"];

#[tokio::test]
async fn reflection_lists_services_and_health_is_serving() {
    let db = TestDb::create().await;
    let controller = TestController::start(portfleet_tests::controller_config(db.options())).await;
    let channel = controller.channel().await;

    let mut client = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let req = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(String::new())),
    };
    let mut stream = client.server_reflection_info(tokio_stream::iter([req])).await.unwrap().into_inner();
    let Some(Ok(resp)) = stream.next().await else { panic!("no reflection response") };
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) = resp.message_response
    else {
        panic!("unexpected reflection response")
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    for expected in EXPECTED {
        assert!(names.iter().any(|n| n == expected), "{expected} missing from {names:?}");
    }

    // v1alpha (grpcurl 1.8) lists and describes with no .proto at hand.
    let mut alpha = v1alpha::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let req = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1alpha::server_reflection_request::MessageRequest::ListServices(String::new())),
    };
    let mut stream = alpha.server_reflection_info(tokio_stream::iter([req])).await.unwrap().into_inner();
    let Some(Ok(resp)) = stream.next().await else { panic!("no v1alpha response") };
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) = resp.message_response
    else {
        panic!("unexpected v1alpha response")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in ["grpc.reflection.v1alpha.ServerReflection", "portfleet.v1.ScanService", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == expected), "{expected} missing from v1alpha {names:?}");
    }
    let req = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
            "portfleet.v1.CreateScanRequest".into(),
        )),
    };
    let mut stream = alpha.server_reflection_info(tokio_stream::iter([req])).await.unwrap().into_inner();
    let Some(Ok(resp)) = stream.next().await else { panic!("no v1alpha response") };
    match resp.message_response {
        Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(fds)) => {
            assert!(!fds.file_descriptor_proto.is_empty());
        }
        other => panic!("unexpected v1alpha response: {other:?}"),
    }

    let mut health = HealthClient::new(channel);
    for service in ["", "portfleet.v1.ScanService"] {
        let status = health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner().status;
        assert_eq!(status, ServingStatus::Serving as i32, "service {service:?}");
    }
}

#[tokio::test]
async fn reflection_and_health_can_be_turned_off() {
    let db = TestDb::create().await;
    let mut config = portfleet_tests::controller_config(db.options());
    (config.reflection, config.health) = (false, false);
    let controller = TestController::start(config).await;
    let channel = controller.channel().await;
    let mut client = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let req = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(String::new())),
    };
    let err = client.server_reflection_info(tokio_stream::iter([req])).await.expect_err("reflection is off");
    assert_eq!(err.code(), tonic::Code::Unimplemented);
    let err = HealthClient::new(channel).check(HealthCheckRequest::default()).await.expect_err("health is off");
    assert_eq!(err.code(), tonic::Code::Unimplemented);
    // The API itself still answers.
    let mut api = controller.client().await;
    api.list_scans(portfleet_proto::v1::ListScansRequest::default()).await.expect("ScanService serves");
}
