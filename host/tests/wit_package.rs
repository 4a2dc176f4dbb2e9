//! The `wit/` package resolves and its `http-function` world has the shape the host links.

use wit_parser::{Resolve, WorldItem, WorldKey};

fn world_items(resolve: &Resolve, exports: bool) -> Vec<String> {
    let pkg = resolve
        .packages
        .iter()
        .find(|(_, p)| p.name.namespace == "wasmgate" && p.name.name == "platform")
        .map(|(id, _)| id)
        .expect("package wasmgate:platform is defined");
    let world = resolve
        .select_world(&[pkg], Some("http-function"))
        .expect("world http-function exists");
    let w = &resolve.worlds[world];
    let items = if exports { &w.exports } else { &w.imports };
    items
        .iter()
        .filter_map(|(key, item)| match (key, item) {
            (WorldKey::Interface(id), WorldItem::Interface { .. }) => resolve.id_of(*id),
            _ => None,
        })
        .collect()
}

#[test]
fn http_function_world_exports_incoming_handler() {
    let mut resolve = Resolve::default();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../wit");
    resolve.push_dir(dir).expect("wit/ resolves");
    assert_eq!(
        world_items(&resolve, true),
        vec!["wasi:http/incoming-handler@0.2.12".to_string()]
    );
    let imports = world_items(&resolve, false);
    for needed in [
        "wasi:http/outgoing-handler@0.2.12",
        "wasi:cli/environment@0.2.12",
        "wasi:io/streams@0.2.12",
        "wasi:clocks/monotonic-clock@0.2.12",
    ] {
        assert!(
            imports.iter().any(|i| i == needed),
            "missing {needed} in {imports:?}"
        );
    }
}
