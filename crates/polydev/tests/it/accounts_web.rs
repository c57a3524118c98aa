//! Accounts on the web against a real SMTP server on localhost (in this process): sign-up →
//! mail → verify → sign-in; sessions with CSRF; wrong password and unknown address
//! indistinguishable; a reset link works once and ends every session; sign out everywhere.

use std::collections::HashMap;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

use polydev::accounts::{self, Mailer, Plan};
use polydev::app::AppState;

use crate::common::TestDb;
use crate::http_api::TestServer;

/// A message the SMTP server received.
#[derive(Debug, Clone)]
pub struct Mail {
    pub to: String,
    pub data: String,
}

impl Mail {
    /// The first `http…` link in the body (quoted-printable decoded).
    pub fn link(&self) -> String {
        let body = decode_quoted_printable(&self.data);
        let start = body.find("http").expect("a link in the mail");
        body[start..].split_whitespace().next().unwrap().to_string()
    }
}

fn decode_quoted_printable(text: &str) -> String {
    let text = text.replace("=\r\n", "").replace("=\n", "");
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'='
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&text[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A minimal SMTP server (RFC 5321: EHLO, MAIL, RCPT, DATA, RSET, NOOP, QUIT; no TLS) that
/// hands every message it receives to the test.
pub struct SmtpServer {
    pub url: String,
    mails: mpsc::UnboundedReceiver<Mail>,
}

impl SmtpServer {
    pub async fn start() -> SmtpServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("smtp://{}", listener.local_addr().unwrap());
        let (sender, mails) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let sender = sender.clone();
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let mut lines = BufReader::new(read).lines();
                    let _ = write.write_all(b"220 localhost test SMTP\r\n").await;
                    let mut to = String::new();
                    while let Ok(Some(line)) = lines.next_line().await {
                        let upper = line.to_ascii_uppercase();
                        let reply: &[u8] = if upper.starts_with("EHLO") || upper.starts_with("HELO")
                        {
                            b"250 localhost\r\n"
                        } else if upper.starts_with("RCPT TO:") {
                            to = line[8..].trim().trim_matches(['<', '>']).to_string();
                            b"250 OK\r\n"
                        } else if upper.starts_with("DATA") {
                            let _ = write.write_all(b"354 go on\r\n").await;
                            let mut data = String::new();
                            while let Ok(Some(line)) = lines.next_line().await {
                                if line == "." {
                                    break;
                                }
                                data.push_str(line.strip_prefix('.').unwrap_or(&line));
                                data.push_str("\r\n");
                            }
                            let _ = sender.send(Mail {
                                to: to.clone(),
                                data,
                            });
                            b"250 queued\r\n"
                        } else if upper.starts_with("QUIT") {
                            let _ = write.write_all(b"221 bye\r\n").await;
                            break;
                        } else {
                            b"250 OK\r\n"
                        };
                        if write.write_all(reply).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        SmtpServer { url, mails }
    }

    /// The next message (a bound against hangs: 20 s).
    pub async fn next_mail(&mut self) -> Mail {
        tokio::time::timeout(Duration::from_secs(20), self.mails.recv())
            .await
            .expect("a mail arrives")
            .expect("the SMTP server runs")
    }
}

/// A browser over HTTP: keeps cookies, never follows redirects.
pub struct Browser {
    pub base: String,
    client: reqwest::Client,
    pub cookies: HashMap<String, String>,
}

impl Browser {
    pub fn new(base: &str) -> Browser {
        polydev::net::install_tls_provider();
        Browser {
            base: base.to_string(),
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            cookies: HashMap::new(),
        }
    }

    fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn absorb(&mut self, response: &reqwest::Response) {
        for value in response.headers().get_all("set-cookie") {
            let value = value.to_str().unwrap();
            let (pair, attributes) = value.split_once(';').unwrap_or((value, ""));
            let (name, v) = pair.split_once('=').unwrap();
            if attributes.contains("Max-Age=0") {
                self.cookies.remove(name);
            } else {
                self.cookies.insert(name.to_string(), v.to_string());
            }
        }
    }

    pub async fn send(&mut self, request: reqwest::RequestBuilder) -> reqwest::Response {
        let request = if self.cookies.is_empty() {
            request
        } else {
            request.header("cookie", self.cookie_header())
        };
        let response = request.send().await.unwrap();
        self.absorb(&response);
        response
    }

    pub fn url(&self, path: &str) -> String {
        if path.starts_with("http") {
            path.to_string()
        } else {
            format!("{}{path}", self.base)
        }
    }

    pub async fn get(&mut self, path: &str) -> reqwest::Response {
        let request = self.client.get(self.url(path));
        self.send(request).await
    }

    /// A JSON request with the CSRF header when `csrf` is given.
    pub async fn json(
        &mut self,
        method: Method,
        path: &str,
        csrf: Option<&str>,
        body: &Value,
    ) -> reqwest::Response {
        let mut request = self.client.request(method, self.url(path)).json(body);
        if let Some(csrf) = csrf {
            request = request.header("x-csrf-token", csrf);
        }
        self.send(request).await
    }

    pub async fn form(&mut self, path: &str, fields: &[(String, String)]) -> reqwest::Response {
        let body = serde_urlencoded::to_string(fields).unwrap();
        let request = self
            .client
            .post(self.url(path))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body);
        self.send(request).await
    }

    /// The CSRF token this browser's forms carry now.
    pub async fn csrf(&mut self) -> String {
        let session: Value = self.get("/v1/account/session").await.json().await.unwrap();
        session["csrf_token"].as_str().unwrap().to_string()
    }

    /// Signs in with the JSON API.
    pub async fn sign_in(&mut self, email: &str, password: &str) -> reqwest::Response {
        let csrf = self.csrf().await;
        self.json(
            Method::POST,
            "/v1/account/signin",
            Some(&csrf),
            &json!({ "email": email, "password": password }),
        )
        .await
    }
}

/// The hidden fields of the first form in `html`, with the page's other inputs left out.
pub fn hidden_fields(html: &str) -> Vec<(String, String)> {
    let mut fields = Vec::new();
    for piece in html.split("<input type=\"hidden\" ").skip(1) {
        let attr = |name: &str| {
            piece
                .split(&format!("{name}=\""))
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .map(unescape)
        };
        if let (Some(name), Some(value)) = (attr("name"), attr("value")) {
            fields.push((name, value));
        }
    }
    fields
}

fn unescape(text: &str) -> String {
    text.replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// A user who signed up and verified their address (through the domain functions).
pub async fn verified_user(db: &TestDb, email: &str, password: &str) -> uuid::Uuid {
    let user = accounts::create_user(&db.pool, email, Plan::Pro)
        .await
        .unwrap();
    let hash = accounts::hash_password(password).await.unwrap();
    sqlx::query(
        "INSERT INTO account_passwords (user_id, password_hash, email_verified_at) VALUES ($1, $2, now())",
    )
    .bind(user.user_id)
    .bind(hash)
    .execute(&db.pool)
    .await
    .unwrap();
    user.user_id
}

async fn server_with_smtp(db: &TestDb) -> (TestServer, SmtpServer) {
    let smtp = SmtpServer::start().await;
    let catalogue = polydev::perspectives::Catalogue::load(None).unwrap();
    let state = AppState::new(
        db.pool.clone(),
        polydev::perspectives::Gateway::new(catalogue),
    )
    .with_mailer(Mailer::smtp(&smtp.url, "Polydev <no-reply@polydev.test>").unwrap());
    (TestServer::start_state(state).await, smtp)
}

async fn code_of(response: reqwest::Response) -> (StatusCode, String) {
    let status = response.status();
    let body: Value = response.json().await.unwrap_or_default();
    (
        status,
        body["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

#[tokio::test]
async fn accounts_sign_up_verify_by_mail_sign_in_and_sign_out_everywhere() {
    let db = TestDb::migrated().await;
    let (server, mut smtp) = server_with_smtp(&db).await;
    let mut browser = Browser::new(&server.base);
    let email = "ada@example.com";
    let password = "correct horse battery staple";

    // Without the CSRF token nothing happens.
    let refused = browser
        .json(
            Method::POST,
            "/v1/account/signup",
            None,
            &json!({ "email": email, "password": password }),
        )
        .await;
    assert_eq!(
        code_of(refused).await,
        (StatusCode::FORBIDDEN, "csrf_failed".into())
    );
    let csrf = browser.csrf().await;
    let signed_up = browser
        .json(
            Method::POST,
            "/v1/account/signup",
            Some(&csrf),
            &json!({ "email": email, "password": password }),
        )
        .await;
    assert_eq!(signed_up.status(), StatusCode::ACCEPTED);
    let mail = smtp.next_mail().await;
    assert_eq!(mail.to, email);
    let link = mail.link();
    assert!(
        link.starts_with(&format!("{}/account/verify?token=", server.base)),
        "{link}"
    );

    // Not verified yet: the right password is refused, and a fresh link is sent.
    let early = browser.sign_in(email, password).await;
    assert_eq!(
        code_of(early).await,
        (StatusCode::FORBIDDEN, "email_unverified".into())
    );
    let _second = smtp.next_mail().await;

    // Follow the link: a page with a button (a GET changes nothing), then the form.
    let page = browser.get(&link).await.text().await.unwrap();
    let fields = hidden_fields(&page);
    assert!(fields.iter().any(|(k, _)| k == "token"), "{page}");
    let done = browser.form("/account/verify", &fields).await;
    assert_eq!(done.status(), StatusCode::OK);
    assert!(done.text().await.unwrap().contains("confirmed"));

    // Sign in: a session cookie, HttpOnly and SameSite=Lax.
    let signed_in = browser.sign_in(email, password).await;
    assert_eq!(signed_in.status(), StatusCode::OK);
    let set_cookie: Vec<String> = signed_in
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect();
    let session_cookie = set_cookie
        .iter()
        .find(|c| c.starts_with("polydev_session="))
        .expect("a session cookie");
    assert!(session_cookie.contains("HttpOnly") && session_cookie.contains("SameSite=Lax"));
    assert!(!session_cookie.contains("Secure"), "plain http here");
    let first_session = browser.cookies["polydev_session"].clone();
    let csrf: String = signed_in.json::<Value>().await.unwrap()["csrf_token"]
        .as_str()
        .unwrap()
        .into();

    // The session acts with the account scope: reads work, writes need the CSRF header.
    let me: Value = browser.get("/v1/me").await.json().await.unwrap();
    assert_eq!(me["user"]["email"], email);
    assert_eq!(browser.get("/v1/tokens").await.status(), StatusCode::OK);
    let no_csrf = browser
        .json(Method::POST, "/v1/tokens", None, &json!({ "name": "ide" }))
        .await;
    assert_eq!(
        code_of(no_csrf).await,
        (StatusCode::FORBIDDEN, "csrf_failed".into())
    );
    let wrong_csrf = browser
        .json(
            Method::POST,
            "/v1/tokens",
            Some(&"0".repeat(64)),
            &json!({ "name": "ide" }),
        )
        .await;
    assert_eq!(wrong_csrf.status(), StatusCode::FORBIDDEN);
    let created = browser
        .json(
            Method::POST,
            "/v1/tokens",
            Some(&csrf),
            &json!({ "name": "ide" }),
        )
        .await;
    assert!(created.status().is_success(), "{}", created.status());
    // Bearer tokens keep working beside the cookie.
    let token: Value = created.json().await.unwrap();
    let with_token = server
        .get("/v1/me", token["token"].as_str())
        .send()
        .await
        .unwrap();
    assert_eq!(with_token.status(), StatusCode::OK);

    // Signing in again rotates the session: the old id no longer works.
    let again = browser.sign_in(email, password).await;
    assert_eq!(again.status(), StatusCode::OK);
    let csrf: String = again.json::<Value>().await.unwrap()["csrf_token"]
        .as_str()
        .unwrap()
        .into();
    assert_ne!(browser.cookies["polydev_session"], first_session);
    let mut stale = Browser::new(&server.base);
    stale
        .cookies
        .insert("polydev_session".into(), first_session.clone());
    assert_eq!(
        code_of(stale.get("/v1/me").await).await,
        (StatusCode::UNAUTHORIZED, "session_invalid".into())
    );

    // A second browser; "sign out everywhere" from the first ends both.
    let mut other = Browser::new(&server.base);
    assert_eq!(
        other.sign_in(email, password).await.status(),
        StatusCode::OK
    );
    assert_eq!(other.get("/v1/me").await.status(), StatusCode::OK);
    let refused = browser
        .json(
            Method::POST,
            "/v1/account/signout-everywhere",
            None,
            &json!({}),
        )
        .await;
    assert_eq!(refused.status(), StatusCode::FORBIDDEN, "CSRF first");
    let out = browser
        .json(
            Method::POST,
            "/v1/account/signout-everywhere",
            Some(&csrf),
            &json!({}),
        )
        .await;
    assert_eq!(out.status(), StatusCode::OK);
    let ended: Value = out.json().await.unwrap();
    assert_eq!(ended["sessions_ended"], 2);
    assert_eq!(other.get("/v1/me").await.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        browser.get("/v1/me").await.status(),
        StatusCode::UNAUTHORIZED
    );
    let stored: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM account_web_sessions WHERE session_hash LIKE '%' || $1 || '%'",
    )
    .bind(&first_session)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(stored, 0, "session ids are stored hashed");
}

#[tokio::test]
async fn accounts_wrong_password_and_unknown_email_are_indistinguishable() {
    let db = TestDb::migrated().await;
    verified_user(&db, "known@example.com", "the right password 1").await;
    let server = TestServer::start(&db).await;
    let mut answers = Vec::new();
    for (email, password) in [
        ("known@example.com", "the wrong password 1"),
        ("unknown@example.com", "the wrong password 1"),
        ("not an address", "the wrong password 1"),
    ] {
        let mut browser = Browser::new(&server.base);
        let response = browser.sign_in(email, password).await;
        let status = response.status();
        let mut headers: Vec<String> = response
            .headers()
            .iter()
            .filter(|(k, _)| !["date", "x-request-id", "content-length"].contains(&k.as_str()))
            .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap()))
            .collect();
        headers.sort();
        let body = response.text().await.unwrap();
        answers.push((status, headers, body));
    }
    assert_eq!(answers[0].0, StatusCode::UNAUTHORIZED);
    assert!(answers[0].2.contains("credentials_invalid"), "{answers:?}");
    assert_eq!(answers[0], answers[1], "wrong password vs unknown address");
    assert_eq!(answers[0], answers[2], "wrong password vs not an address");

    // Sign-up of a taken address answers like a new one (the mail differs, not the answer).
    let mut browser = Browser::new(&server.base);
    let csrf = browser.csrf().await;
    let mut signups = Vec::new();
    for email in ["known@example.com", "fresh@example.com"] {
        let response = browser
            .json(
                Method::POST,
                "/v1/account/signup",
                Some(&csrf),
                &json!({ "email": email, "password": "a long enough password" }),
            )
            .await;
        signups.push((response.status(), response.text().await.unwrap()));
    }
    assert_eq!(signups[0], signups[1]);
    assert_eq!(signups[0].0, StatusCode::ACCEPTED);
}

#[tokio::test]
async fn accounts_a_reset_link_works_once_and_ends_every_session() {
    let db = TestDb::migrated().await;
    let (server, mut smtp) = server_with_smtp(&db).await;
    let email = "grace@example.com";
    verified_user(&db, email, "the old password 1").await;
    // A user made by `polydev user create` has no password: a reset gives them one.
    let cli_user = accounts::create_user(&db.pool, "cli@example.com", Plan::Free)
        .await
        .unwrap();
    let mut signed_in = Browser::new(&server.base);
    assert_eq!(
        signed_in
            .sign_in(email, "the old password 1")
            .await
            .status(),
        StatusCode::OK
    );

    let mut browser = Browser::new(&server.base);
    let csrf = browser.csrf().await;
    for address in ["nobody@example.com", email] {
        let response = browser
            .json(
                Method::POST,
                "/v1/account/password-reset",
                Some(&csrf),
                &json!({ "email": address }),
            )
            .await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
    }
    // The unknown address got nothing: the first mail is the known one's.
    let mail = smtp.next_mail().await;
    assert_eq!(mail.to, email);
    let link = mail.link();
    assert!(link.contains("/account/reset?token="), "{link}");

    let page = browser.get(&link).await.text().await.unwrap();
    let mut fields = hidden_fields(&page);
    fields.push(("password".into(), "the new password 2".into()));
    fields.push(("password_again".into(), "the new password 2".into()));
    // Without the CSRF field: 403, and the link is still unused.
    let without: Vec<(String, String)> = fields
        .iter()
        .filter(|(k, _)| k != "csrf_token")
        .cloned()
        .collect();
    assert_eq!(
        browser.form("/account/reset", &without).await.status(),
        StatusCode::FORBIDDEN
    );
    let done = browser.form("/account/reset", &fields).await;
    assert_eq!(done.status(), StatusCode::OK);
    assert!(done.text().await.unwrap().contains("Password changed"));
    // Once only.
    let again = browser.form("/account/reset", &fields).await;
    assert_eq!(again.status(), StatusCode::BAD_REQUEST);
    assert!(again.text().await.unwrap().contains("not valid"));

    // Every session ended; the new password works, the old one does not.
    assert_eq!(
        signed_in.get("/v1/me").await.status(),
        StatusCode::UNAUTHORIZED
    );
    let mut fresh = Browser::new(&server.base);
    assert_eq!(
        fresh.sign_in(email, "the old password 1").await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        fresh.sign_in(email, "the new password 2").await.status(),
        StatusCode::OK
    );

    // The CLI-made user sets a first password the same way.
    let response = browser
        .json(
            Method::POST,
            "/v1/account/password-reset",
            Some(&csrf),
            &json!({ "email": "cli@example.com" }),
        )
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let link = smtp.next_mail().await.link();
    let page = browser.get(&link).await.text().await.unwrap();
    let mut fields = hidden_fields(&page);
    fields.push(("password".into(), "first password here".into()));
    fields.push(("password_again".into(), "first password here".into()));
    assert_eq!(
        browser.form("/account/reset", &fields).await.status(),
        StatusCode::OK
    );
    let mut cli = Browser::new(&server.base);
    let response = cli.sign_in("cli@example.com", "first password here").await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["user_id"], json!(cli_user.user_id));
}

#[tokio::test]
async fn accounts_forms_without_the_csrf_token_are_refused() {
    let db = TestDb::migrated().await;
    verified_user(&db, "form@example.com", "the right password 1").await;
    let server = TestServer::start(&db).await;
    let mut browser = Browser::new(&server.base);
    let page = browser.get("/account/signin?next=/").await;
    assert_eq!(page.status(), StatusCode::OK);
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(csp.contains("default-src 'none'"), "{csp}");
    let html = page.text().await.unwrap();
    let fields = hidden_fields(&html);
    let mut form: Vec<(String, String)> = vec![
        ("email".into(), "form@example.com".into()),
        ("password".into(), "the right password 1".into()),
        ("next".into(), "/".into()),
    ];
    assert_eq!(
        browser.form("/account/signin", &form).await.status(),
        StatusCode::FORBIDDEN
    );
    form.push((
        "csrf_token".into(),
        fields
            .iter()
            .find(|(k, _)| k == "csrf_token")
            .unwrap()
            .1
            .clone(),
    ));
    // A token from another browser does not match this one's cookie.
    let mut other = Browser::new(&server.base);
    assert_eq!(
        other.form("/account/signin", &form).await.status(),
        StatusCode::FORBIDDEN
    );
    let ok = browser.form("/account/signin", &form).await;
    assert_eq!(ok.status(), StatusCode::SEE_OTHER);
    assert_eq!(ok.headers()["location"], "/");
    assert!(browser.cookies.contains_key("polydev_session"));
    // An off-site `next` is ignored.
    form.retain(|(k, _)| k != "next");
    form.push(("next".into(), "//evil.example/".into()));
    let csrf = browser.csrf().await;
    form.retain(|(k, _)| k != "csrf_token");
    form.push(("csrf_token".into(), csrf));
    let ok = browser.form("/account/signin", &form).await;
    assert_eq!(ok.headers()["location"], "/");
    // Sign-out needs the token too.
    assert_eq!(
        browser
            .json(Method::POST, "/v1/account/signout", None, &json!({}))
            .await
            .status(),
        StatusCode::FORBIDDEN
    );
    let csrf = browser.csrf().await;
    assert_eq!(
        browser
            .json(Method::POST, "/v1/account/signout", Some(&csrf), &json!({}))
            .await
            .status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        browser.get("/v1/me").await.status(),
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn accounts_mail_sending_requests_are_limited_per_address() {
    let db = TestDb::migrated().await;
    let server = TestServer::start(&db).await;
    let mut browser = Browser::new(&server.base);
    let csrf = browser.csrf().await;
    let mut statuses = Vec::new();
    for i in 0..11 {
        let response = browser
            .json(
                Method::POST,
                "/v1/account/password-reset",
                Some(&csrf),
                &json!({ "email": format!("victim{i}@example.com") }),
            )
            .await;
        statuses.push(response.status());
    }
    assert!(
        statuses[..10].iter().all(|s| *s == StatusCode::ACCEPTED),
        "{statuses:?}"
    );
    assert_eq!(statuses[10], StatusCode::TOO_MANY_REQUESTS);
}
