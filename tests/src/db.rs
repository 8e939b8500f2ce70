//! A fresh database per test, dropped when the test ends (pass or fail).

use std::str::FromStr;

use sqlx::{Connection, PgConnection, postgres::PgConnectOptions};

/// The server the tests use; `PORTFLEET_TEST_DATABASE_URL` overrides it.
pub fn admin_url() -> String {
    std::env::var("PORTFLEET_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub struct TestDb {
    name: String,
    url: String,
}

async fn admin_connection() -> PgConnection {
    let url = admin_url();
    match PgConnection::connect(&url).await {
        Ok(c) => c,
        Err(e) => panic!(
            "Postgres is not reachable at {url}: {e}. The tests need a real Postgres; \
             run them with scripts/test.sh, which starts it when it is installed but stopped."
        ),
    }
}

impl TestDb {
    pub async fn create() -> Self {
        let name = format!("pft_{}", uuid::Uuid::new_v4().simple());
        let mut admin = admin_connection().await;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .expect("create test database");
        let base = admin_url();
        let url = match base.rsplit_once('/') {
            Some((server, _)) if server.contains("://") && !server.ends_with('/') => format!("{server}/{name}"),
            _ => panic!("PORTFLEET_TEST_DATABASE_URL must end with /DATABASE: {base}"),
        };
        Self { name, url }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn options(&self) -> PgConnectOptions {
        PgConnectOptions::from_str(&self.url).expect("test database url")
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The controller's store on this database, migrated: for making
    /// tokens, enrollment tokens and revocations as the CLI does.
    pub async fn store(&self) -> portfleet_controller::store::Store {
        use portfleet_controller::store::{DatabaseConfig, Store};
        let config = DatabaseConfig {
            options: self.options(),
            pool_size: 2,
            acquire_timeout: std::time::Duration::from_secs(10),
        };
        let store = Store::connect_lazy(&config);
        store.migrate(&Default::default()).await.expect("migrate");
        store
    }

    /// A new API token of `scope` in this database, as `portfleet-controller
    /// tokens create` makes it.
    pub async fn token(&self, scope: portfleet_controller::auth::Scope) -> String {
        let store = self.store().await;
        let t = portfleet_controller::auth::create_token(&store, "test", scope, None).await.expect("create token");
        store.close().await;
        t.token
    }

    /// A connection for assertions made straight against the tables.
    pub async fn connect(&self) -> PgConnection {
        PgConnection::connect(&self.url).await.expect("connect to test database")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop may run inside a runtime: use a thread with its own.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                return;
            };
            rt.block_on(async move {
                let Ok(mut admin) = PgConnection::connect(&admin_url()).await else {
                    return;
                };
                let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
                    .execute(&mut admin)
                    .await;
            });
        })
        .join();
    }
}
