//! The linking pitfall, second half: naming the plugin crate once (`use plugin_fixture as _;`)
//! links it, and its plugin is registered.

use plugin_fixture as _;

#[tokio::test]
async fn a_referenced_plugin_crate_is_linked() {
    let names: Vec<&str> = broker_core::available().iter().map(|p| p.name).collect();
    assert!(names.contains(&"fixture"), "`use plugin_fixture as _;` must link the fixture plugin: {names:?}");
    assert!(names.contains(&"memory"), "{names:?}");
    let plugin = broker_core::plugin("fixture").expect("the fixture plugin is registered");
    // Nothing else from plugin_fixture is named here (its constants would be inlined, not linked).
    assert!(plugin.capabilities.queue_groups && plugin.capabilities.redelivery, "{:?}", plugin.capabilities);
    let broker = broker_core::from_name("fixture", Default::default()).expect("the fixture factory builds a broker");
    broker.connect().await.expect("the fixture's broker connects");
    broker.disconnect().await.expect("and disconnects");
}
