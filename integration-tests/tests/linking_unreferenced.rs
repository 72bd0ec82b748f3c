//! The linking pitfall, first half: `plugin-fixture` is a (dev-)dependency of this crate, but this
//! test names nothing from it, so the linker leaves it out and its plugin is not registered.
//!
//! Do not add `use plugin_fixture` here: that is what `linking_referenced.rs` tests.

#[test]
fn an_unreferenced_plugin_crate_is_not_linked() {
    let names: Vec<&str> = broker_core::available().iter().map(|p| p.name).collect();
    assert!(names.contains(&"memory"), "broker-core's own plugin is always linked: {names:?}");
    assert!(
        !names.contains(&"fixture"),
        "plugin-fixture is not referenced by this test binary, yet its plugin is registered: {names:?}"
    );
    let error = broker_core::from_name("fixture", Default::default()).expect_err("fixture is not linked");
    assert_eq!(error.kind(), broker_core::ErrorKind::UnknownBackend, "{error}");
}
