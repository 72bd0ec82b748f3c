//! Choosing a registry by name, as Go Micro's `MICRO_REGISTRY` / `MICRO_REGISTRY_ADDRESS`.

use std::sync::Arc;

use broker_core::parse_addresses;

use crate::{
    DEFAULT_REGISTRY, ENV_REGISTRY, ENV_REGISTRY_ADDRESS, Error, KNOWN_REGISTRIES, LocalRegistry, MemoryRegistry,
    Result, SharedRegistry,
};

/// Opens the registry called `name` (`memory`, `local` or `etcd`, case-insensitive) with
/// `addresses`:
/// - `memory`: the process-wide [`MemoryRegistry::global`]; addresses are ignored.
/// - `local`: a [`LocalRegistry`] in the default directory, or in `addresses[0]` (a directory).
/// - `etcd`: an `EtcdRegistry` (module `etcd`) connected to `addresses` (default
///   `127.0.0.1:2379`); needs the cargo feature `etcd`.
///
/// An unknown name is an [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput) error listing
/// the known ones; `etcd` without the feature is
/// [`ErrorKind::BackendNotLinked`](crate::ErrorKind::BackendNotLinked).
pub async fn from_name(name: &str, addresses: &[String]) -> Result<SharedRegistry> {
    open(name, addresses, None).await
}

/// [`from_lookup`] over the process environment: `MICRO_REGISTRY` (default `local`),
/// `MICRO_REGISTRY_ADDRESS` (comma-separated) and, for etcd, `ETCD_USERNAME` / `ETCD_PASSWORD`.
pub async fn from_env() -> Result<SharedRegistry> {
    from_lookup(|key| std::env::var(key).ok()).await
}

/// Like [`from_env`], reading the variables through `lookup` instead of the environment (for
/// tests and for configuration read from elsewhere).
pub async fn from_lookup<F>(lookup: F) -> Result<SharedRegistry>
where
    F: Fn(&str) -> Option<String>,
{
    let name = lookup(ENV_REGISTRY).map(|name| name.trim().to_owned()).filter(|name| !name.is_empty());
    let name = name.as_deref().unwrap_or(DEFAULT_REGISTRY);
    let addresses = lookup(ENV_REGISTRY_ADDRESS).map(|value| parse_addresses(&value)).unwrap_or_default();
    let credentials = lookup("ETCD_USERNAME")
        .filter(|user| !user.is_empty())
        .map(|user| (user, lookup("ETCD_PASSWORD").unwrap_or_default()));
    open(name, &addresses, credentials).await
}

async fn open(name: &str, addresses: &[String], credentials: Option<(String, String)>) -> Result<SharedRegistry> {
    match name.trim().to_ascii_lowercase().as_str() {
        "memory" => Ok(MemoryRegistry::global()),
        "local" => {
            let registry = match addresses {
                [] => LocalRegistry::new()?,
                [dir] => LocalRegistry::with_dir(dir)?,
                _ => {
                    return Err(Error::invalid_input(format!(
                        "the local registry takes one directory as its address, got {}: {}",
                        addresses.len(),
                        addresses.join(",")
                    )));
                }
            };
            Ok(Arc::new(registry))
        }
        "etcd" => open_etcd(addresses, credentials).await,
        _ => Err(Error::invalid_input(format!(
            "registry {name:?} not found: known registries are {}",
            KNOWN_REGISTRIES.join(", ")
        ))),
    }
}

#[cfg(feature = "etcd")]
async fn open_etcd(addresses: &[String], credentials: Option<(String, String)>) -> Result<SharedRegistry> {
    let mut options = crate::etcd::EtcdOptions::new(addresses.to_vec());
    if let Some((user, password)) = credentials {
        options = options.with_credentials(user, password);
    }
    Ok(Arc::new(crate::EtcdRegistry::connect_with(options).await?))
}

#[cfg(not(feature = "etcd"))]
async fn open_etcd(_addresses: &[String], _credentials: Option<(String, String)>) -> Result<SharedRegistry> {
    Err(Error::new(
        crate::ErrorKind::BackendNotLinked,
        "the etcd registry is not compiled in: enable the `etcd` feature of broker-registry \
         (or of micro-broker / broker-cli, which forward it)",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |key| map.get(key).cloned()
    }

    #[tokio::test]
    async fn memory_is_the_global_instance() {
        let a = from_name("memory", &[]).await.unwrap();
        let b = from_lookup(env(&[("MICRO_REGISTRY", " Memory ")])).await.unwrap();
        assert_eq!(a.name(), "memory");
        assert!(Arc::ptr_eq(&a, &b));
        assert!(Arc::ptr_eq(&a, &MemoryRegistry::global()));
    }

    #[tokio::test]
    async fn local_uses_the_address_as_directory() {
        let dir = std::env::temp_dir().join(format!("broker-registry-select-{}", std::process::id()));
        let registry =
            from_lookup(env(&[("MICRO_REGISTRY", "local"), ("MICRO_REGISTRY_ADDRESS", dir.to_str().unwrap())]))
                .await
                .unwrap();
        assert_eq!(registry.name(), "local");
        assert!(dir.is_dir());
        assert!(format!("{registry:?}").contains(dir.to_str().unwrap()));
        std::fs::remove_dir_all(&dir).unwrap();

        let err = from_name("local", &["a".into(), "b".into()]).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
    }

    #[tokio::test]
    async fn default_is_local_in_the_default_dir() {
        let registry = from_lookup(env(&[])).await.unwrap();
        assert_eq!(registry.name(), "local");
        assert!(format!("{registry:?}").contains(LocalRegistry::default_dir().unwrap().to_str().unwrap()));
    }

    #[tokio::test]
    async fn unknown_name_lists_the_known_ones() {
        let err = from_name("mdns", &[]).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
        let text = err.to_string();
        assert!(text.contains("\"mdns\"") && text.contains("memory, local, etcd"), "{text}");
    }

    #[cfg(not(feature = "etcd"))]
    #[tokio::test]
    async fn etcd_without_the_feature_says_how_to_enable_it() {
        let err = from_lookup(env(&[("MICRO_REGISTRY", "etcd")])).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::BackendNotLinked);
        let text = err.to_string();
        assert!(text.contains("`etcd` feature of broker-registry") && text.contains("micro-broker"), "{text}");
    }

    #[cfg(feature = "etcd")]
    #[tokio::test]
    async fn etcd_unreachable_is_a_connection_error_naming_the_address() {
        let err = from_lookup(env(&[("MICRO_REGISTRY", "etcd"), ("MICRO_REGISTRY_ADDRESS", "127.0.0.1:1")]))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
        assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
    }
}
