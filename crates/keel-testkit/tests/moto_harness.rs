//! The moto harness: accounts on the shared server are isolated, a Python without moto says
//! how to install it, and a server of a test's own can be reset.

mod common;

use common::{create_role, Env};
use keel_testkit::inventory::Inventory;
use keel_testkit::moto::{MotoError, MotoOptions, MotoServer};
use keel_testkit::proxy::Rules;

/// Two accounts on the shared moto server do not see each other's resources.
#[tokio::test]
async fn accounts_on_the_shared_server_do_not_see_each_other() {
    let a = Env::new(Rules::seeded(14)).await;
    let b = Env::new(Rules::seeded(14)).await;
    create_role(&a.iam(), "mine").await.unwrap();
    a.iot()
        .create_thing()
        .thing_name("mine")
        .send()
        .await
        .unwrap();
    assert!(b.truth().await.is_empty());
    let truth = a.truth().await;
    assert_eq!((truth.roles.len(), truth.things.len()), (1, 1));
}

/// A Python without moto gives `MotoError::NotInstalled` and a missing interpreter
/// `MotoError::NoPython`, both saying how to install moto.
#[test]
fn a_python_without_moto_gives_an_error_that_says_how_to_install_it() {
    let options = MotoOptions {
        python: "python3".into(),
        python_args: vec!["-S".into()],
    };
    let error = MotoServer::start(options).unwrap_err();
    assert!(matches!(error, MotoError::NotInstalled { .. }), "{error}");
    assert!(
        error.to_string().contains("pip install 'moto[server]'"),
        "{error}"
    );
    let options = MotoOptions {
        python: "/nonexistent/python3".into(),
        python_args: vec![],
    };
    let error = MotoServer::start(options).unwrap_err();
    assert!(matches!(error, MotoError::NoPython { .. }), "{error}");
    assert!(error.to_string().contains("pip install"), "{error}");
}

/// A moto server of a test's own can be reset to empty.
#[tokio::test]
async fn a_server_of_its_own_can_be_reset_to_empty() {
    let server = MotoServer::start(MotoOptions::default()).expect("moto starts");
    let account = server.new_account().unwrap();
    let config = account.sdk_config().await;
    create_role(&aws_sdk_iam::Client::new(&config), "before-reset")
        .await
        .unwrap();
    assert_eq!(Inventory::read(&config).await.unwrap().roles.len(), 1);
    server.reset().unwrap();
    assert!(Inventory::read(&config).await.unwrap().is_empty());
    drop(server);
}
